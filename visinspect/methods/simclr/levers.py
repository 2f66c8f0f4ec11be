"""SimCLR's anomaly-detection levers by name: plain data, so that the command line can list them
without loading PyTorch."""

# PretrainConfig's anomaly-detection levers; all off by default.
LEVERS = ("defect_negatives", "rotation_negatives", "dense_weight", "mean_shifted", "l2sp_weight",
          "freeze_head_bn")
# Each lever at the setting measured as a row of `compare` and `loo` (method "simclr+NAME": SimCLR
# on the source and the target's good images with that lever): name -> PretrainConfig overrides.
# L2-SP's weight was chosen once, on the real-data screen of docs/experiments.md (100 harmed least; 1
# as much as plain SimCLR), for every target alike.
LEVER_SETS: dict[str, dict] = {
    "defect-negatives": {"defect_negatives": True},
    "rotation-negatives": {"rotation_negatives": True},
    "dense": {"dense_weight": 0.5},  # DenseCL's share
    "mean-shifted": {"mean_shifted": True},
    "l2sp": {"l2sp_weight": 100.0},
    "frozen-head-bn": {"freeze_head_bn": True},
}
