"""Offline tools over routing traces: trace files and their validator, the recorder, the simulator
(which drives the runtime's residency core with a virtual clock) and the predictor factory."""
