from lmforge.service import run
from services.quantizer.handlers import QuantizerService

run(QuantizerService)
