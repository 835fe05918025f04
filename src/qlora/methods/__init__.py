"""Training methods beside SFT: what a preference batch's loss is.

One small module per method, each with the same three names:

    LAYOUT          the data it reads: "pairs" (prompt/chosen/rejected) or "unpaired" (KTO)
    USES_REFERENCE  whether it needs the reference log-probs (the base, adapters off)
    losses(policy, reference, opts) -> (per-example losses [B], {metric: values})

`preference.py` runs them: the one forward over a batch's rows, the reference forward under
no_grad with the adapters off, the metrics TRL logs, the evaluation. SFT is the model's own loss
(train/step.py) and has no module here. `qlora train` and the planner (memory/) read these facts
from here, by name through method_module.
"""

from qlora.errors import QloraError
from qlora.methods import dpo, kto, orpo, simpo

PREFERENCE_METHODS = {"dpo": dpo, "orpo": orpo, "simpo": simpo, "kto": kto}
METHODS = ("sft", *PREFERENCE_METHODS)


def method_module(name: str):
    """The module of a preference method, or None for SFT."""
    return PREFERENCE_METHODS.get(name)


def check_precomputed_reference(name: str, precomputed: bool) -> None:
    """Refuse precomputed reference log-probs where a method has none to precompute: only a
    paired method's reference (DPO's) is fixed per example; KTO's KL rows pair anew in every
    micro-batch. `qlora train` (config) and `qlora plan` (memory.PlanConfig) both ask here."""
    method = method_module(name)
    if not precomputed or (method is not None and method.USES_REFERENCE and method.LAYOUT == "pairs"):
        return
    if method is None:
        why = "SFT has no reference model"
    elif method.USES_REFERENCE:
        why = "KTO's reference is also taken on KL sequences that each micro-batch pairs anew"
    else:
        why = f"--method {name} has no reference model"
    raise QloraError(f"option `precompute_ref_log_probs` is for --method dpo: {why}; leave it off")
