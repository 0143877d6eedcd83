// Open one study in the OHIF Viewer the way a radiologist would, and report what the page shows.
//
//   node tests/browser/ohif.mjs SPEC.json
//
// SPEC: {"url": viewer URL of the study, "chromium": path, "out_dir": folder for screenshots,
//        "width": 1920, "height": 1080,
//        "steps": [{"name": "sr", "open": "<series description>", "waitText": "<optional>"}]}
// For each step the series whose thumbnail carries that description is double-clicked into the
// viewport, and once the network is quiet (and, with waitText, once an annotation containing
// that text is drawn: opened again after 30 s without, three tries) a screenshot
// <out_dir>/<name>.png is taken. Printed
// on stdout, one JSON document: per step the texts drawn over the image (SVG annotation
// layer), the counts of drawn shapes, the viewport's text, the PDF object's data URL, whether
// an error boundary or an error toast showed, and the console errors.
import fs from 'node:fs';
import path from 'node:path';
import puppeteer from 'puppeteer-core';

const spec = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const width = spec.width ?? 1920;
const height = spec.height ?? 1080;
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

const browser = await puppeteer.launch({
  executablePath: spec.chromium,
  headless: true,
  // SwiftShader: headless machines have no GPU, and OHIF renders with WebGL.
  args: ['--no-sandbox', '--disable-dev-shm-usage', '--use-angle=swiftshader', '--enable-unsafe-swiftshader',
         `--window-size=${width},${height}`],
});
const result = { load: {}, steps: [] };
try {
  const page = await browser.newPage();
  await page.setViewport({ width, height });
  let consoleErrors = [];
  page.on('console', (m) => { if (m.type() === 'error') consoleErrors.push(m.text().slice(0, 500)); });
  page.on('pageerror', (e) => consoleErrors.push(`pageerror: ${e.message}`.slice(0, 500)));

  const settle = async () => {
    await page.waitForNetworkIdle({ idleTime: 1500, timeout: 60000 }).catch(() => {});
    await sleep(2500); // rendering after the last response (WebGL in software, SVG annotations)
  };
  const clickText = async (text, count) => {
    const handles = await page.$$(`xpath/.//*[normalize-space(text())=${JSON.stringify(text)}]`);
    if (!handles.length) return false;
    await handles[0].click({ count });
    return true;
  };
  const snapshot = () => page.evaluate(() => {
    const grid = document.querySelector('[data-cy="viewport-grid"]') || document.body;
    // one entry per line of a text box (<tspan>), else per <text>
    const svgTexts = [...grid.querySelectorAll('svg text')].flatMap((t) => {
      const spans = t.querySelectorAll('tspan');
      return (spans.length ? [...spans] : [t]).map((s) => s.textContent.trim());
    }).filter(Boolean);
    const count = (selector) => grid.querySelectorAll(selector).length;
    const objects = [...document.querySelectorAll('object[type="application/pdf"]')];
    const toasts = [...document.querySelectorAll('[data-sonner-toast]')].map((t) => ({
      type: t.getAttribute('data-type'), text: t.innerText.slice(0, 300) }));
    return {
      svgTexts,
      shapes: { ellipse: count('svg ellipse'), circle: count('svg circle'), polyline: count('svg polyline'),
                path: count('svg path'), line: count('svg line') },
      viewportText: grid.innerText.slice(0, 4000),
      pageText: document.body.innerText.slice(0, 8000),
      pdfObjects: objects.map((o) => ({ data: o.getAttribute('data') || '', width: o.clientWidth, height: o.clientHeight })),
      toasts,
      errorBoundary: /Something went wrong/i.test(document.body.innerText),
    };
  });

  await page.goto(spec.url, { waitUntil: 'networkidle2', timeout: 90000 });
  await settle();
  await clickText('Skip all', 1); // the first-visit tour
  await sleep(500);
  result.load = { ...(await snapshot()), consoleErrors };
  consoleErrors = [];
  for (const step of spec.steps) {
    let found = await clickText(step.open, 2);
    await settle();
    if (found && step.waitText) {
      // On a loaded machine the SR's annotations can come well after the network is quiet
      // (the referenced image is decoded and drawn in software first), and now and then OHIF
      // shows the SR's image without its annotations: wait, bounded, and open the series
      // again as a reader would (three tries).
      const drawn = async () => (await snapshot()).svgTexts.some((t) => t.includes(step.waitText));
      for (let attempt = 0; attempt < 3 && !(await drawn()); attempt++) {
        const deadline = Date.now() + (step.waitMs ?? 30000);
        while (Date.now() < deadline && !(await drawn())) await sleep(1000);
        if (!(await drawn()) && attempt < 2) {
          found = await clickText(step.open, 2);
          await settle();
        }
      }
      await sleep(1000);
    }
    const shot = path.join(spec.out_dir, `${step.name}.png`);
    await page.screenshot({ path: shot });
    result.steps.push({ name: step.name, open: step.open, found, screenshot: shot, ...(await snapshot()), consoleErrors });
    consoleErrors = [];
  }
} finally {
  await browser.close();
}
process.stdout.write(JSON.stringify(result));
