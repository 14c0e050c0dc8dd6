-- Argo CD health of a MedForge CompositeModel (Lua 5.1, as Argo CD runs it).
local hs = {status = "Progressing", message = "Waiting for the MedForge operator"}
local function condition(status, ctype)
  if status.conditions == nil then return nil end
  for _, c in ipairs(status.conditions) do
    if c.type == ctype then return c end
  end
  return nil
end
if obj.spec ~= nil and obj.spec.paused == true then
  hs.status = "Suspended"
  hs.message = "spec.paused is true: no new revision is merged"
  return hs
end
if obj.status == nil then return hs end
local st = obj.status
if st.observedGeneration == nil or st.observedGeneration ~= obj.metadata.generation then
  hs.message = "The operator has not seen this generation yet"
  return hs
end
local ready = condition(st, "Ready")
local stalled = condition(st, "Stalled")
local reconciling = condition(st, "Reconciling")
local serving = ""
if st.current ~= nil and st.current.revision ~= nil then
  serving = "; serving revision " .. tostring(st.current.revision)
end
if stalled ~= nil and stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = (stalled.reason or "Stalled") .. ": " .. (stalled.message or "") .. serving
  return hs
end
if reconciling ~= nil and reconciling.status == "True" then
  hs.message = (reconciling.reason or "") .. ": " .. (reconciling.message or "") .. serving
  return hs
end
-- The newest revision was refused by the gate (or had no usable input): the model is still
-- served, but what the hospitals contributed last did not make it in.
if st.history ~= nil and st.history[1] ~= nil and st.history[1].state == "Rejected" then
  local last = st.history[1]
  hs.status = "Degraded"
  hs.message = "Revision " .. tostring(last.revision) .. " rejected (" .. (last.reason or "") ..
    "): " .. (last.message or "") .. serving
  return hs
end
if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = (ready.reason or "") .. ": " .. (ready.message or "")
  return hs
end
if ready ~= nil then
  hs.message = (ready.reason or "") .. ": " .. (ready.message or "")
end
return hs
