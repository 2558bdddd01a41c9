"""User tools (installed as `dms_scripts`): generate, evaluate, push to hub, build base models, benchmarks."""
