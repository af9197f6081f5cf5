"""One path from a model name to a running engine, in five stages, each a function in a module of
its own with a typed, frozen result:

    resolve    (resolve.py)      names -> model files, headers read and checked once     -> Resolved
    plan       (planning.py)     machine, costs, drafters -> Plan; backend options;
                                 how the runtime decodes (Decoding), derived once        -> Planned
    load       (loading.py)      the backends                                            -> Loaded
    calibrate  (calibration.py)  measured pass costs; the plan again with them            -> Calibrated
    assemble   (assemble.py)     capabilities checked, schedule, Runtime.from_plan       -> Engine

`Engine.load` (engine.py) runs them in order; each can be run and tested alone.
"""
