"""The harness' fine-tuning methods: the registry and base class (:mod:`.base`), and one module per
method family. Importing this package registers every method; the command line lists them from
:data:`gradkit.train.method_options.CATALOGUE` without importing it (and so without torch)."""

from gradkit.train.methods.base import (
    METHODS,
    Method,
    accumulate_gradients,
    available_methods,
    get_method,
    parts_of,
    register_method,
)
from gradkit.train.methods.full import Full, Head
from gradkit.train.methods.lora import Lora
from gradkit.train.methods.lora_ga import LoraGA
from gradkit.train.methods.lora_pro import LoraGaPro, LoraPlus, LoraPro, lora_pro_optimizer
from gradkit.train.methods.lora_rite import LoraRite
from gradkit.train.methods.noise_scale_probe import NoiseScaleProbe
from gradkit.train.methods.peft_inits import Corda, Eva, Olora, Pissa
from gradkit.train.methods.peft_lora_ga import PeftLoraGA
from gradkit.train.methods.zeroth_order import Mezo, PolicyGradient, objective_value
from gradkit.train.optimizers import adamw, decay_groups

__all__ = [
    "METHODS",
    "Corda",
    "Eva",
    "Full",
    "Head",
    "Lora",
    "LoraGA",
    "LoraGaPro",
    "LoraPlus",
    "LoraPro",
    "LoraRite",
    "Method",
    "Mezo",
    "NoiseScaleProbe",
    "Olora",
    "PeftLoraGA",
    "Pissa",
    "PolicyGradient",
    "accumulate_gradients",
    "adamw",
    "available_methods",
    "decay_groups",
    "get_method",
    "lora_pro_optimizer",
    "objective_value",
    "parts_of",
    "register_method",
]
