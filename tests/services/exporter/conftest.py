"""One export of the fixture model, shared by the exporter's tests (an export takes
several seconds on 2 cores)."""

from __future__ import annotations

import pytest

from services.exporter.packaging import ExportOptions
from services.exporter.triton_repository import TritonModelOptions

TRITON_NAME = "fortune"


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory, trained_model, prepared_dataset):
    """The directory packaging.write_export makes of the trained fixture model."""
    from lmforge.modeling import load_causal_lm, load_token_stream
    from services.exporter.packaging import write_export

    work = tmp_path_factory.mktemp("export")
    model = load_causal_lm(trained_model.path)
    options = ExportOptions(tolerance=1e-3, int8=True, perplexity_windows=16,
                            triton=TritonModelOptions(name=TRITON_NAME, max_batch_size=4,
                                                      instance_kind="KIND_CPU"))
    report = write_export(model, trained_model.path,
                          load_token_stream(prepared_dataset.path, "heldout"), work, options,
                          {"source_model": trained_model.digest})
    return work, report
