"""Training methods beside SFT: what a preference batch's loss is.

One small module per method, each with the same three names:

    LAYOUT          the data it reads: "pairs" (prompt/chosen/rejected) or "unpaired" (KTO)
    USES_REFERENCE  whether it needs the reference log-probs (the base, adapters off)
    losses(policy, reference, opts) -> (per-example losses [B], {metric: values})

`preference.py` runs them: the one forward over a batch's rows, the reference forward under
no_grad with the adapters off, the metrics TRL logs, the evaluation. SFT is the model's own loss
(train/step.py) and has no module here.
"""

from qlora.methods import dpo, kto, orpo, simpo

PREFERENCE_METHODS = {"dpo": dpo, "orpo": orpo, "simpo": simpo, "kto": kto}
METHODS = ("sft", *PREFERENCE_METHODS)


def method_module(name: str):
    """The module of a preference method, or None for SFT."""
    return PREFERENCE_METHODS.get(name)
