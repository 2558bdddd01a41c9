"""Entry points (installed as `dms_train`): `accelerate launch train/retrofit.py ...`."""
