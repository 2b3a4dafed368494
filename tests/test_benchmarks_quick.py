import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_attention_bench_quick(tmp_path):
    output = tmp_path / "attention.json"
    subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "attention_bench.py"), "--quick", "--json", str(output)],
        check=True,
        cwd=REPO,
        timeout=180,
        capture_output=True,
    )
    results = json.loads(output.read_text())
    assert set(results["cp_efficiency"]) == {"dense@1", "ring@2", "allgather@2"}
    for timing in results["cp_efficiency"].values():
        assert timing["wall_s"]["median"] > 0 and timing["cpu_s"]["median"] > 0
    assert results["cp_efficiency"]["dense@1"]["efficiency_wall"] == 1.0
    short = results["short_pack"]
    assert set(short["timings_s"]) == {"cp_attention_packed", "bare_kernel_per_sequence", "sdpa_padded_batch"}
    assert short["num_sequences"] == results["config"]["num_short"]
