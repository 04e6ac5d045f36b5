"""AIMET off the console: inside `quiet_aimet` (the quantization pass, the sims' QDQ export) AIMET's
log records and the Python warnings it raises go to a log file, and the console gets one line with
the count and the file's path; the quantized lowering keeps an export's in the bundle
(`targets.quantized.aimet_log`). A real (tiny) AIMET sim is built, so real AIMET warnings are routed."""

from __future__ import annotations

import logging
import re

import pytest
import torch
from torch import nn

from passes._aimet import support as aq
from targets.quantized import aimet_log

MULTIPLE = ("Multiple input ops exist, traversal to find closest producer is performed based on the "
            "first input")  # what AIMET's quantsim logs on its Quant area, once per ambiguous MatMul input


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.softmax(torch.matmul(self.q(x), self.k(x).transpose(-1, -2)) * 0.35, -1)
        return torch.matmul(a, self.v(x)) + x


class Spy(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append(record.getMessage())


@pytest.fixture
def spies():
    """Handlers on AIMET's Quant area and on the root logger: whatever reached them could reach a console."""
    from aimet_torch.common.utils import AimetLogger

    quant = AimetLogger.get_area_logger(AimetLogger.LogAreas.Quant)
    found = {"quant": Spy(), "root": Spy()}
    quant.addHandler(found["quant"])
    logging.getLogger().addHandler(found["root"])
    yield quant, found
    quant.removeHandler(found["quant"])
    logging.getLogger().removeHandler(found["root"])


def _build_sim(n_multiple: int) -> None:
    """A tiny sim built and calibrated as the pass does (HTP config): AIMET warns as it goes; the
    Quant area's ambiguous-producer warning is logged as quantsim logs it."""
    from aimet_torch.common.quantsim_config.config_utils import get_path_for_target_config
    from aimet_torch.common.utils import AimetLogger
    from aimet_torch.quantsim import QuantizationSimModel

    torch.manual_seed(0)
    m, x = Attention().eval(), torch.randn(1, 4, 8)
    aq.make_quantizable(m, lambda mod: mod(x))
    sim = QuantizationSimModel(m, (x,), default_output_bw=16, default_param_bw=8,
                               config_file=get_path_for_target_config("htp_quantsim_config_v79"))
    sim.compute_encodings(lambda mod: mod(x))
    for _ in range(n_multiple):
        AimetLogger.get_area_logger(AimetLogger.LogAreas.Quant).warning(MULTIPLE)


def _warning_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if re.match(r"\S+ \S+ (WARNING|ERROR|CRITICAL) ", line)]


def test_aimet_warnings_go_to_the_file_and_the_console_shows_a_count(tmp_path, spies, capfd, caplog, monkeypatch):
    # the count line goes to the "ndopt" logger: caplog reads it even where an earlier test in this
    # process set up the CLI's console handler (which would print it, and its words, to stderr)
    monkeypatch.setattr(logging.getLogger("ndopt"), "handlers", [])
    monkeypatch.setattr(logging.getLogger("ndopt"), "propagate", True)
    caplog.set_level(logging.INFO, logger="ndopt")
    quant, spy = spies
    before = (quant.level, list(quant.handlers), quant.propagate)
    log = tmp_path / "pass" / "aimet.log"
    log.parent.mkdir()
    with aq.quiet_aimet(log):
        _build_sim(n_multiple=3)
        with aq.quiet_aimet():  # a nested block (the sim's QDQ export inside the pass): same file
            logging.getLogger("Quant").warning(MULTIPLE)
    text = log.read_text()
    assert text.count(MULTIPLE) == 4
    assert "DeprecationWarning" in text or "UserWarning" in text  # AIMET's Python warnings, kept too
    warned = _warning_lines(text)
    lines = [r.getMessage() for r in caplog.records if r.name == "ndopt"]
    assert len(lines) == 1 and str(log) in lines[0] and f"AIMET: {len(warned)} warnings" in lines[0]
    out, err = capfd.readouterr()
    assert "Multiple input" not in out + err and "Warning" not in out + err
    assert spy["quant"].seen == [] and not [m for m in spy["root"].seen if not m.startswith("AIMET: ")]
    assert (quant.level, list(quant.handlers), quant.propagate) == before  # AIMET's own setup is back


def test_without_a_file_nothing_reaches_the_console(tmp_path, spies, capfd, caplog):
    caplog.set_level(logging.DEBUG)
    _, spy = spies
    with aq.quiet_aimet():
        logging.getLogger("Quant").warning(MULTIPLE)
    out, err = capfd.readouterr()
    assert "Multiple input" not in out + err and not any("Multiple" in m for m in spy["root"].seen)
    assert list(tmp_path.iterdir()) == []


def test_the_lowering_keeps_an_exports_warnings_in_the_bundle(tmp_path, capfd, caplog):
    """What `lower_quantized` does around the sim's export (a `quiet_aimet` block inside), and one
    line for a whole bundle when `aimet_log` also encloses all its graphs."""
    caplog.set_level(logging.INFO, logger="ndopt")
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    with aimet_log(bundle / "aimet.log", what="every QDQ graph"):
        for _graph in range(3):
            with aimet_log(bundle / "aimet.log", what="one graph"), aq.quiet_aimet():
                logging.getLogger("Quant").warning(MULTIPLE)
                import warnings

                warnings.warn("tracer says hello", UserWarning, stacklevel=1)
    text = (bundle / "aimet.log").read_text()
    assert text.count(MULTIPLE) == 3 and text.count("UserWarning: tracer says hello") == 3
    lines = [r.getMessage() for r in caplog.records if r.name == "ndopt"]
    assert lines == [f"AIMET: 6 warnings while exporting every QDQ graph, written to {bundle / 'aimet.log'}"]
    out, err = capfd.readouterr()
    assert "Multiple input" not in out + err and "hello" not in out + err
