from lmforge.service import run
from services.cost_autoscaler.handlers import AutoscalerService

run(AutoscalerService)
