"""Every tool ends bad input with one line naming the file, key or value, exit status 2 and no
traceback (one only with ``--debug``), and says nothing else before its own output: its
``--help`` runs without a warning, names only config files that exist and prints its examples
line by line. A bug (any error that is not an :class:`~pretrain.errors.InputError`) ends with
its traceback and exit status 1, a full disk with one line naming the file and exit status 1."""
from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.tool_main import Tool

REPO = Path(__file__).resolve().parents[1]
TOOLS = sorted(p.stem for p in (REPO / "tools").glob("*.py") if not p.name.startswith("_"))
PRETRAIN_CONFIG = "configs/builtin/bicaptioning_R_18_L1_H256.yaml"
D2_CONFIG = "configs/detectron2/cpu/coco_segm_default_init_cpu.yaml"


def run_tool(name: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / f"{name}.py"), *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False, env=env)


@pytest.mark.parametrize("tool", TOOLS)
def test_help_runs_clean_and_names_existing_configs(tool):
    result = run_tool(tool, "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr == "", f"{tool} --help printed to stderr:\n{result.stderr[-2000:]}"
    for config in re.findall(r"configs/[\w/.-]+\.yaml", result.stdout):
        assert (REPO / config).is_file(), f"{tool} --help names {config}, which does not exist"
    # Examples print as written: a continued command keeps its " \\" and line break (a lone
    # backslash at a line's end in a docstring joins the lines, leaving a run of spaces).
    description = re.split(r"\n(?:positional arguments|options):\n", result.stdout)[0]
    for line in description.splitlines():
        assert not re.search(r"\S {5,}[^\s#]", line), f"{tool} --help runs lines together: {line.strip()}"


CAPTION_EVAL_TRANSFORM = "DATA.IMAGE_TRANSFORM_CAPTION_EVAL"


@pytest.mark.parametrize("tool, says", [
    ("caption", [CAPTION_EVAL_TRANSFORM]),
    ("eval_captioning", [CAPTION_EVAL_TRANSFORM]),
    ("visualize_attention", [CAPTION_EVAL_TRANSFORM]),
    ("pretrain", ["tcmalloc", "MALLOC_MMAP_MAX_=0", "VIRTEX_D2_MALLOC=default", "LD_PRELOAD"]),
])
def test_help_says_what_the_tool_does(tool, says):
    """The caption tools transform images with DATA.IMAGE_TRANSFORM_CAPTION_EVAL, not the val
    transforms their help named; tools/pretrain.py prefers tcmalloc and honours VIRTEX_D2_MALLOC,
    where its help told of tuned glibc only; tools/caption.py reads every suffix that
    list_image_files reads (its help left out .gif and .tif)."""
    from pretrain.data.images import IMAGE_SUFFIXES
    from tests.tool_main import Tool

    description = " ".join(Tool(tool).module.__doc__.split())  # what --help prints above the flags
    for text in says:
        assert text in description, f"{tool} --help does not say {text}"
    assert "validation transforms" not in description
    if tool == "caption":
        assert f"(not recursive; {' '.join(IMAGE_SUFFIXES)})" in description


def bad_inputs(tmp: Path) -> list[tuple[str, list, str]]:
    """(tool, arguments, what the one line must say) for every tool."""
    empty = tmp / "empty"
    empty.mkdir()
    garbage = tmp / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    a_file = tmp / "a_file"
    a_file.write_text("not a folder")
    missing = tmp / "missing.yaml"
    header_only = tmp / "captions.csv"
    header_only.write_text("image,caption\n")
    return [
        ("pretrain", ["--config", PRETRAIN_CONFIG, "--output-dir", tmp / "p", "OPTIM.BATCH_SIZE", "eight"],
         "OPTIM.BATCH_SIZE"),
        ("pretrain", ["--config", PRETRAIN_CONFIG, "--output-dir", tmp / "p", "OPTIM.NO_SUCH_KEY", "1"],
         "OPTIM.NO_SUCH_KEY"),
        ("pretrain", ["--config", missing, "--output-dir", tmp / "p"], f"{missing}: config file not found"),
        ("build_vocabulary", ["--captions", tmp / "none.json", "--output", tmp / "v"], "none.json: file not found"),
        ("caption", ["--config", PRETRAIN_CONFIG, "--checkpoint", garbage, "--images", empty], f"{empty}: no image files"),
        ("eval_captioning", ["--config", missing, "--checkpoint", garbage], f"{missing}: config file not found"),
        ("visualize_attention", ["--config", missing, "--checkpoint", garbage, "--output-dir", tmp / "a"],
         f"{missing}: config file not found"),
        ("clf_voc07", ["--config", missing, "--random-init"], f"{missing}: config file not found"),
        ("clf_linear", ["--config", missing, "--random-init", "--data-root", empty, "--output-dir", tmp / "l"],
         f"{missing}: config file not found"),
        ("convert_backbone", ["--input", garbage, "--output", tmp / "out.pth", "--config-file", D2_CONFIG],
         f"{garbage}: not a PyTorch checkpoint"),
        ("train_net", ["--config-file", D2_CONFIG, "SOLVER.MAX_ITER", "many"], "SOLVER.MAX_ITER"),
        ("train_net", ["--config-file", missing], f"{missing}: config file not found"),
        ("report", [empty, "--output", tmp / "r"], f"{empty}: no inference"),
        ("make_synthetic_dataset", ["--root", a_file, "--num-train", "8", "--num-val", "2"], str(a_file)),
        ("demo", ["--num-train", "0", "--output-dir", tmp / "d", "--data-root", tmp / "dd"],
         "need at least 8 training"),
        ("benchmark", ["pretrain", "--config", missing], f"{missing}: config file not found"),
        ("check_dataset", ["--pretrain-config", missing], f"{missing}: config file not found"),
        ("make_shards", ["--coco-captions", tmp / "none.json", "--image-root", empty, "--output", tmp / "s"],
         "none.json"),
        ("make_shards", ["--captions-csv", header_only, "--image-root", empty, "--output", tmp / "s"],
         f"{header_only}: the table has a header but no rows"),
        ("submit_pretrain", ["--config", missing, "--output-dir", tmp / "sp", "--local"],
         f"{missing}: config file not found"),
    ]


@pytest.mark.parametrize("tool, flag, kind, says", [
    ("caption", "--output", "folder", "is a folder; give the name of the file to write"),
    ("eval_captioning", "--output", "folder", "is a folder; give the name of the file to write"),
    ("visualize_attention", "--output-dir", "file", "is a file; give a folder to write into"),
])
def test_an_output_of_the_wrong_kind_is_refused_before_any_work(tmp_path, capsys, tool, flag, kind, says):
    """``--output results/`` (a folder) with --force, or an --output-dir that is a file: the
    tools ran the model over every image, then failed writing with a traceback (status 1)."""
    output = tmp_path / "out"
    output.mkdir() if kind == "folder" else output.write_text("x")
    argv = ["--config", str(tmp_path / "missing.yaml"), "--checkpoint", str(tmp_path / "c.pth"), flag, str(output),
            "--force", *(["--images", str(tmp_path)] if tool == "caption" else [])]
    assert Tool(tool).main(argv) == 2
    assert capsys.readouterr().err == f"{tool}: error: {output}: {says}" + (
        f", e.g. {output / 'out.json'}\n" if kind == "folder" else "\n")


def test_every_tool_is_in_the_table(tmp_path):
    assert {tool for tool, _, _ in bad_inputs(tmp_path)} == set(TOOLS)


@pytest.mark.parametrize("case", range(20))
def test_bad_input_ends_with_one_line_and_status_2(tmp_path, case):
    cases = bad_inputs(tmp_path)
    assert len(cases) == 20, "keep the parametrize range in step with the table"
    tool, args, expected = cases[case]
    result = run_tool(tool, *args)
    assert result.returncode == 2, f"{tool} {args}: status {result.returncode}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{tool}: error: ") and expected in last, result.stderr[-3000:]


DEVICE_TOOLS = {
    "caption": ["--checkpoint", "c.pth", "--images", "."],
    "eval_captioning": ["--checkpoint", "c.pth"],
    "visualize_attention": ["--checkpoint", "c.pth", "--output-dir", "a"],
    "clf_voc07": ["--random-init"],
}


@pytest.mark.parametrize("tool", sorted(DEVICE_TOOLS))
def test_an_unknown_device_is_refused_in_one_line_by_every_tool_that_takes_one(tool):
    """``--device`` (virtex_d2.cli.add_common_flags) is checked as it is parsed: "gpu" used to
    reach torch and end in its traceback once the model was built."""
    result = run_tool(tool, "--config", "c.yaml", *DEVICE_TOOLS[tool], "--device", "gpu")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"{tool}.py: error: --device gpu is not a torch device (use cpu, cuda or cuda:N)")


@pytest.mark.parametrize(("tool", "args", "message"), [
    # no image to show: the page was written into a folder never made (FileNotFoundError traceback)
    ("visualize_attention", ["--config", "c.yaml", "--checkpoint", "c.pth", "--output-dir", "a", "--max-images", "0"],
     "--max-images must be 1 or more, got 0"),
    # SentencePiece's internal check "(trainer_spec.vocab_size()) > (0)", after reading every caption
    ("build_vocabulary", ["--captions", "c.json", "--output", "v", "--vocab-size", "0"],
     "--vocab-size must be 1 or more, got 0"),
])
def test_a_count_flag_below_one_is_refused_before_any_input_is_read(tool, args, message):
    result = run_tool(tool, *args)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == f"{tool}.py: error: {message}"


@pytest.mark.parametrize("tool", ["caption", "eval_captioning"])
def test_an_output_that_cannot_be_written_is_refused_before_the_checkpoint_is_read(tool, tmp_path):
    """An --output under a file used to fail with a FileExistsError traceback after all the
    captioning; the unreadable checkpoint shows that nothing before the output check ran."""
    a_file = tmp_path / "photo.png"
    a_file.write_bytes(b"not a folder")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    images = ["--images", str(tmp_path)] if tool == "caption" else []
    result = run_tool(tool, "--config", PRETRAIN_CONFIG, "--checkpoint", garbage, *images,
                      "--output", a_file / "captions.json")
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith(f"{tool}: error: {a_file}: cannot write files there")


def test_debug_shows_the_traceback(tmp_path):
    missing = tmp_path / "missing.yaml"
    quiet = run_tool("caption", "--config", missing, "--checkpoint", "x.pth", "--images", tmp_path)
    loud = run_tool("caption", "--debug", "--config", missing, "--checkpoint", "x.pth", "--images", tmp_path)
    assert "Traceback" not in quiet.stderr and "Traceback" in loud.stderr and "config file not found" in loud.stderr


def test_check_dataset_debug_shows_the_traceback(tmp_path):
    missing = tmp_path / "missing.yaml"
    quiet = run_tool("check_dataset", "--pretrain-config", missing)
    loud = run_tool("check_dataset", "--debug", "--pretrain-config", missing)
    assert (quiet.returncode, loud.returncode) == (2, 1), loud.stderr[-3000:]
    assert "Traceback" not in quiet.stderr and "Traceback" in loud.stderr and "ConfigError" in loud.stderr


def run_with_fault(tmp_path: Path, fault: str) -> subprocess.CompletedProcess:
    """Run tools/make_synthetic_dataset.py with ``fault`` (a statement) raised from where it
    writes its first image: Pillow's ``Image.save``, below all of the tool's own code."""
    script = textwrap.dedent(f"""
        import errno, runpy, sys
        sys.path.insert(0, "tools")
        from PIL import Image

        def save(self, fp, *args, **kwargs):
            {fault}

        Image.Image.save = save
        sys.argv = ["tools/make_synthetic_dataset.py", "--root", {str(tmp_path / "root")!r},
                    "--num-train", "8", "--num-val", "2", "--image-size", "64"]
        runpy.run_path("tools/make_synthetic_dataset.py", run_name="__main__")
    """)
    return subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                          check=False)


@pytest.mark.parametrize("fault", [
    "raise KeyError('width')",  # a bug in our code
    "raise ValueError('not enough values to unpack')",  # ValueError is not bad input either
    "raise RuntimeError('The size of tensor a (4) must match the size of tensor b (3)')",  # torch shape mismatch
    "raise FileNotFoundError(errno.ENOENT, 'No such file or directory', '/nonexistent/cache')",  # plain OSError
])
def test_a_bug_ends_with_its_traceback_and_status_1(tmp_path, fault):
    result = run_with_fault(tmp_path, fault)
    assert result.returncode == 1, f"status {result.returncode}\n{result.stderr[-3000:]}"
    assert "Traceback (most recent call last)" in result.stderr, result.stderr[-3000:]
    assert "in save" in result.stderr and "make_synthetic_dataset: error:" not in result.stderr, result.stderr[-3000:]


def test_a_full_disk_says_what_and_where_with_status_1(tmp_path):
    result = run_with_fault(tmp_path, "raise OSError(errno.ENOSPC, 'No space left on device', fp)")
    assert result.returncode == 1, f"status {result.returncode}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"make_synthetic_dataset: error: disk full while writing {tmp_path / 'root'}"), last
    assert re.search(r"\.(jpg|png): No space left on device; free space there", last), last
