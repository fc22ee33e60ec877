from lmforge.service import run
from services.scheduler.handlers import SchedulerService

run(SchedulerService)
