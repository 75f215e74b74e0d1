"""Prompt mixes (issue 30.2): a new prompt every N images, unique to its run, and every table states its mix."""
from __future__ import annotations

import pytest

from benchmarks.prompt_mix import parse_mixes, prompt_for, text_share
from ipiqa.errors import IPIQAError


def test_mixes_are_read_in_the_order_given_without_duplicates():
    assert parse_mixes("1,4,10") == (1, 4, 10)
    assert parse_mixes("10, 1,10") == (10, 1)


@pytest.mark.parametrize("bad", ["0", "-1", "two", "1.5", ""])
def test_a_mix_that_is_not_a_positive_whole_number_is_refused_with_the_fix(bad):
    with pytest.raises(IPIQAError, match="--images-per-prompt"):
        parse_mixes(bad)


@pytest.mark.parametrize("mix, distinct", [(1, 20), (4, 5), (10, 2)])
def test_a_run_of_20_images_sees_one_new_prompt_every_mix_images(mix, distinct):
    prompts = [prompt_for(i, mix, "run") for i in range(20)]
    assert len(set(prompts)) == distinct
    assert all(prompts[i] == prompts[i - i % mix] for i in range(20))


def test_two_runs_never_share_a_prompt_so_no_cache_hit_crosses_runs():
    assert not {prompt_for(i, 1, "batch 1") for i in range(8)} & {prompt_for(i, 1, "batch 4") for i in range(8)}


def test_prompts_carry_real_prompt_lengths_where_the_label_files_are_there():
    """The runtime cuts each text call at its end-of-text, so a short synthetic prompt would understate the text
    encoder: the prompts are AIGCQA-20k's (behind the run's tag), or the report says they are not."""
    from benchmarks.prompt_mix import _real_prompts, prompt_source
    from ipiqa.export.prompt_sets import datasets_folder

    if datasets_folder() is None:
        assert "short synthetic prompts" in prompt_source()
        pytest.skip("no label files beside the checkout (../shared/datasets)")
    real = _real_prompts()
    assert [prompt_for(i, 1, "run").split(": ", 1)[1] for i in range(3)] == list(real[:3])
    assert "AIGCQA-20k" in prompt_source()


def test_the_text_encoder_share_per_image_is_one_pass_per_prompt():
    assert text_share(1) == 1.0 and text_share(4) == 0.25


def test_the_option_rejects_a_bad_mix_as_one_usage_line(capsys):
    from benchmarks.__main__ import _args

    with pytest.raises(SystemExit) as exc:
        _args(["--images-per-prompt", "0"])
    assert exc.value.code == 2 and "--images-per-prompt" in capsys.readouterr().err
    assert _args(["--images-per-prompt", "1,10"]).mixes == (1, 10)
    assert _args([]).mixes == (10,)


def _results(**extra):
    base = {"machine": {"cpu": "c", "cores": 2, "gpu": {}}, "slug": "s", "resolution": 224, "timestamp": "t"}
    return {**base, **extra}


def _row(backend, mix, rate, **kw):
    return {"backend": backend, "batch": 8, "images_per_prompt": mix, "images_per_s": rate, "p50_ms": 8e3 / rate,
            "p99_ms": 8e3 / rate, "note": "n", **kw}


def test_every_engine_and_end_to_end_table_states_its_mix():
    from benchmarks.report import markdown

    runs = [_row("onnxruntime-cpu", m, 3.0) for m in (1, 10)] + [_row("auto", 1, 8.0, picked="openvino-cpu-int8")]
    e2e = [{"name": "auto, prompt cache on", "backend": "auto", "picked": "openvino-cpu-int8", "images_per_prompt": m,
            "batch": 8, "images": 8, "images_per_s": 7.0, "cache_hits": 0, "cache_misses": 8} for m in (1, 10)]
    text = markdown(_results(images_per_prompt=[1, 10], runs=runs, end_to_end=e2e))
    assert "## Engine only, 1 image per prompt" in text and "## Engine only, 10 images per prompt" in text
    assert "## End to end (JPEG files on disk -> scores), 1 image per prompt" in text
    assert "## End to end (JPEG files on disk -> scores), 10 images per prompt" in text
    assert "| auto → openvino-cpu-int8 | 8 |" in text and "| auto → openvino-cpu-int8, prompt cache on |" in text
    one = text.split("## Engine only, 1 image per prompt")[1].split("## Engine only, 10")[0]
    assert one.count("| onnxruntime-cpu |") == 1


def test_an_older_results_file_with_one_mix_still_renders():
    from benchmarks.report import markdown

    rows = [{k: v for k, v in _row("onnxruntime-cpu", 10, 3.0).items() if k != "images_per_prompt"}]
    assert "| onnxruntime-cpu | 8 |" in markdown(_results(images_per_prompt=10, runs=rows))
