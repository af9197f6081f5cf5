"""Planning before anything loads: the machine (hardware, profile), model costs (costmodel),
measured costs (calibrate) and learned acceptance (history) turned into a Plan (planner, a pure
function) for the engine (choose). See docs/ARCHITECTURE.md."""
