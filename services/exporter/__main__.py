from lmforge.service import run
from services.exporter.handlers import ExporterService

run(ExporterService)
