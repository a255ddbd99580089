"""Training for LoRASA policies: multi-agent environments, MAPPO (PS / NPS / PS+LoRA), CLI, evaluation.

Everything here writes the artifacts `lorasa_serve` serves (a policy directory) plus training-only
state beside it (`train_state/`, metrics, plots). Nothing here is needed to serve a policy.
"""
