"""pi0 / pi0.5 checkpoints in openpi's PyTorch layout and lerobot's: the layouts (``layout``), the
model config from tensor shapes (``infer``), loading (``load``), saving and random ones (``save``)."""

from pi_build.errors import CheckpointError
from pi_build.model.checkpoints.infer import infer_config
from pi_build.model.checkpoints.layout import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, CheckpointInfo, Layout
from pi_build.model.checkpoints.load import load_checkpoint, read_assets
from pi_build.model.checkpoints.save import make_random_checkpoint, save_checkpoint

__all__ = [
    "CONFIG_FILE", "TOKENIZER_FILE", "WEIGHTS_FILE", "CheckpointError", "CheckpointInfo", "Layout", "infer_config",
    "load_checkpoint", "make_random_checkpoint", "read_assets", "save_checkpoint",
]
