-- Argo CD health of a MedForge Institution (Lua 5.1, as Argo CD runs it).
local hs = {status = "Progressing", message = "Waiting for the MedForge operator to read its keys"}
if obj.status == nil then return hs end
local st = obj.status
if st.observedGeneration == nil or st.observedGeneration ~= obj.metadata.generation then
  hs.message = "The operator has not seen this generation yet"
  return hs
end
local ready = nil
if st.conditions ~= nil then
  for _, c in ipairs(st.conditions) do
    if c.type == "Ready" then ready = c end
  end
end
if ready == nil then return hs end
if ready.status == "True" then
  hs.status = "Healthy"
else
  hs.status = "Degraded"
end
hs.message = (ready.reason or "") .. ": " .. (ready.message or "")
return hs
