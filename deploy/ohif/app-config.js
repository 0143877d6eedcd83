/** OHIF Viewer 3.13 configuration for a CXR-BMD site: one data source, Orthanc's DICOMweb.
 *
 * The viewer and DICOMweb are served from one origin: the web server in front of OHIF passes
 * /dicom-web/ on to Orthanc (with the Host header kept, so the BulkDataURIs that Orthanc
 * writes point back through it). Orthanc's DICOMweb plugin (Debian orthanc-dicomweb 1.x)
 * cannot render PDFs, so PDFs are fetched as bulk data ("pdf" is not in singlepart).
 */
window.config = {
  routerBasename: '/',
  extensions: [],
  modes: [],
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  showErrorDetails: 'always',
  investigationalUseDialog: { option: 'never' },
  defaultDataSourceName: 'orthanc',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {
        friendlyName: 'Orthanc (PACS)',
        name: 'orthanc',
        wadoUriRoot: '/dicom-web',
        qidoRoot: '/dicom-web',
        wadoRoot: '/dicom-web',
        qidoSupportsIncludeField: false,
        supportsReject: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        staticWado: false,
        singlepart: 'bulkdata,video',
        omitQuotationForMultipartRequest: true,
        bulkDataURI: { enabled: true },
      },
    },
  ],
};
