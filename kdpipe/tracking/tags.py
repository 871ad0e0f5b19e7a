"""The tags kdpipe sets on MLflow runs: what each run is, and how runs refer to each other."""

TAG_KIND, TAG_JOB, TAG_STAGE, TAG_FINGERPRINT = "kdpipe.kind", "kdpipe.job", "kdpipe.stage", "kdpipe.fingerprint"
TAG_TEACHER = "kdpipe.teacher"  # kdpipe.teacher.<stage> = the MLflow run whose weights this stage learned from
TAG_CHECKPOINT, TAG_RESUMED = "kdpipe.checkpoint", "kdpipe.resumed_from"
TAG_SEED = "kdpipe.seed"  # on a stage run: the seed it trained with (one repeat of `seeds:`)
TAG_SETTINGS = "kdpipe.set"  # on a job run: the `--set PATH=VALUE` settings of the command line, a JSON list
TAG_NODE = "kdpipe.node"  # kdpipe.node.<rank> = the Ray node id that rank of the stage ran on
# A searched stage's trials are runs nested under its run: kind "trial", the Ray Tune trial id, the sampled values
# (on the stage run: its best trial's).
TAG_TRIAL, TAG_VALUES, TAG_PRUNED = "kdpipe.trial", "kdpipe.trial.values", "kdpipe.pruned"
TAG_BEST_TRIAL = "kdpipe.search.best_trial"  # on the stage run: the trial whose weights are the stage's result
TAG_HOLDER, TAG_HEARTBEAT = "kdpipe.lease.holder", "kdpipe.lease.heartbeat"  # the driver training a run, and when
# it last said so (seconds since the epoch); see `kdpipe.tracking.lease`.
# On kdpipe's experiments: what MLflow's UI needs to open on the runs table (model training), not its GenAI view.
EXPERIMENT_KIND, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
