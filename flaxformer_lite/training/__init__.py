"""Training: optimizer, losses, tasks, parallelism (mesh, rules, jit/pmap steps), checkpoints, metrics, the loop.
Generic over models: it receives the model from train.py."""
from .checkpoint import Checkpoints
from .host import keep_freed_memory
from .loop import NonFiniteLoss, Outcome, evaluate, train
from .metrics import MetricsLog, read_metrics
from .optimizer import make_optimizer, make_schedule
from .parallel import RULES, make_mesh, parse_mesh
from .tasks import MODEL_FOR_OBJECTIVE, Task, make_task

__all__ = ["Checkpoints", "keep_freed_memory", "NonFiniteLoss", "Outcome", "evaluate", "train", "MetricsLog",
           "read_metrics", "make_optimizer", "make_schedule", "RULES", "make_mesh", "parse_mesh", "MODEL_FOR_OBJECTIVE",
           "Task", "make_task"]
