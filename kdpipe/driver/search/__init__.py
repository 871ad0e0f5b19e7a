"""A stage with a `search:` block: Ray Tune around the stage (`run`), each trial the stage itself with sampled
values (`trial`), the scheduler and the driver's record of trials (`scheduler`), the result (`record`)."""
