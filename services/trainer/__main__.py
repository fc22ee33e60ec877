from lmforge.service import run
from services.trainer.handlers import TrainerService

run(TrainerService)
