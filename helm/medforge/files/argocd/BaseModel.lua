-- Argo CD health of a MedForge BaseModel (Lua 5.1, as Argo CD runs it).
local hs = {status = "Progressing", message = "Waiting for the MedForge operator to verify it"}
local function condition(status, ctype)
  if status.conditions == nil then return nil end
  for _, c in ipairs(status.conditions) do
    if c.type == ctype then return c end
  end
  return nil
end
if obj.status == nil then return hs end
local st = obj.status
if st.observedGeneration ~= nil and st.observedGeneration ~= obj.metadata.generation then
  hs.message = "The operator has not seen this generation yet"
  return hs
end
local ready = condition(st, "Ready")
local stalled = condition(st, "Stalled")
if st.phase == "Ready" and ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = ready.message or "Verified"
  return hs
end
if st.phase == "Failed" or (stalled ~= nil and stalled.status == "True") then
  hs.status = "Degraded"
  local c = stalled or ready or {}
  hs.message = (c.reason or "Failed") .. ": " .. (c.message or "")
  return hs
end
if ready ~= nil then
  hs.message = (ready.reason or "") .. ": " .. (ready.message or "")
end
return hs
