"""Training: optimizer, losses, tasks, the step (one `TrainStep`, laid out as jit over a mesh or pmap), parallelism (mesh, rules), checkpoints,
metrics, the loop. Generic over models: it receives the model from the run entry point (`flaxformer_lite.run`)."""
from .checkpoint import Checkpoints
from .host import keep_freed_memory
from .loop import NonFiniteLoss, Outcome, evaluate, train
from .metrics import MetricsLog, read_metrics
from .optimizer import make_optimizer, make_schedule
from .parallel import RULES, make_mesh, parse_mesh
from .step import MeshLayout, PmapLayout, TrainStep, check_layout, make_step
from .tasks import Task, make_task

__all__ = ["Checkpoints", "keep_freed_memory", "NonFiniteLoss", "Outcome", "evaluate", "train", "MetricsLog",
           "read_metrics", "make_optimizer", "make_schedule", "RULES", "make_mesh", "parse_mesh", "TrainStep",
           "MeshLayout", "PmapLayout", "check_layout", "make_step", "Task", "make_task"]
