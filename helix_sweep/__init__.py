"""helix_sweep: the HELIX audio study as a Ray Tune sweep, one MLflow run per trial."""

import os

# MLflow's telemetry (on by default outside CI) fetches its config from the internet in a thread
# started by `import mlflow`, and when that fails (a closed cluster) the thread deletes an
# environment variable. A log call reading os.environ at that moment (requests looks up proxies on
# every request) fails with KeyError '_MLFLOW_TELEMETRY_SESSION_ID': seen as a trial's first
# log-batch "unreachable" for 12 s. A sweep sends nothing out; every helix_sweep process imports this
# package before MLflow, and the processes it starts (Ray workers, the tracking server) inherit it.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
