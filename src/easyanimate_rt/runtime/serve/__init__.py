"""The job server (``easyanimate-rt serve``): an HTTP job API (app.py) over a SQLite job
store (store.py), with workers that each keep one runtime Pipeline warm (jobs.py,
server.py) or Ray Serve replicas (ray_workers.py). Running jobs checkpoint their
denoising state (runtime/loop_state.py), so a killed server resumes them exactly."""
