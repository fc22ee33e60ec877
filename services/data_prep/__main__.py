from lmforge.service import run
from services.data_prep.handlers import DataPrepService

run(DataPrepService)
