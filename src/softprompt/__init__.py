"""softprompt: prompt tuning (Lester et al. 2021) for frozen language models."""

from .backbone import Backbone
from .data import Dataset, Example, load_dataset
from .errors import SoftPromptError
from .evaluate import Prediction, Report, evaluate, predict
from .loader import load_model
from .prompt import SoftPrompt
from .tasks import TaskSpec
from .train import TrainConfig, TrainResult, train

__all__ = ["Backbone", "Dataset", "Example", "Prediction", "Report", "SoftPrompt", "SoftPromptError", "TaskSpec",
           "TrainConfig", "TrainResult", "evaluate", "load_dataset", "load_model", "predict", "train"]
__version__ = "0.1.0"
