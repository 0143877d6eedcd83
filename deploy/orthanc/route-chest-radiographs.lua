-- Orthanc auto-routing to the CXR-BMD screening node (the DICOM modality "cxrbmd" in
-- orthanc.json): every radiograph stored in Orthanc that looks like a chest film is sent on.
--
-- Only CR and DX images are routed, never what the node sends back (SR, GSPS): they are not
-- images, and anything arriving from the node's own AE title is skipped as well, so a routing
-- loop cannot form. The node decides eligibility itself (view, age, landmarks); this filter
-- only keeps obviously unrelated studies off the network. Body Part Examined is optional in
-- CR/DX, so a missing one is routed and left to the node.
--
-- Sends run as Orthanc jobs (asynchronous), so a slow node never blocks storage here. A job
-- that fails (node down) shows under /jobs; resend with POST /modalities/cxrbmd/store.

local NODE_MODALITY = 'cxrbmd'   -- the key in DicomModalities
local NODE_AET = 'CXRBMD'        -- the node's [node] ae_title

local IMAGE_CLASSES = {
  ['1.2.840.10008.5.1.4.1.1.1'] = true,      -- Computed Radiography Image Storage
  ['1.2.840.10008.5.1.4.1.1.1.1'] = true,    -- Digital X-Ray Image Storage - For Presentation
  ['1.2.840.10008.5.1.4.1.1.1.1.1'] = true,  -- Digital X-Ray Image Storage - For Processing
}

local function is_chest(tags)
  local part = string.upper(tags['BodyPartExamined'] or '')
  return part == '' or part == 'CHEST' or part == 'THORAX' or part == 'LUNG'
end

function OnStoredInstance(instanceId, tags, metadata, origin)
  if origin ~= nil and origin['RemoteAet'] == NODE_AET then
    return  -- the node's own results coming back
  end
  if not IMAGE_CLASSES[metadata['SopClassUid'] or tags['SOPClassUID'] or ''] then
    return
  end
  if not is_chest(tags) then
    return
  end
  local body = DumpJson({ Resources = { instanceId }, Asynchronous = true }, true)
  RestApiPost('/modalities/' .. NODE_MODALITY .. '/store', body, true)
  print('routed ' .. instanceId .. ' to ' .. NODE_MODALITY)
end
