"""Both C++ clients take gpupool's choice of scaled_dot_product_attention's backend from one header,
client/sdpa_choice.h (client/torch/native_guard.cpp, client/native/native_client.cpp); each library is cached by a
hash of its source, so both hashes cover the header's bytes too: an edit of the header rebuilds both."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from gpupool.client.native import build
from gpupool.client.torch import native


def test_both_sources_include_the_header_and_define_no_choice_of_their_own() -> None:
    assert native.HEADER == build.HEADER and native.HEADER.is_file()
    for source in (native.SOURCE, build.SOURCE):
        text = source.read_text()
        assert '#include "sdpa_choice.h"' in text
        assert "gpupool_sdpa::sdp_choice(" in text and "SDPBackend::overrideable" not in text


def test_an_edit_of_the_header_changes_both_build_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUPOOL_NATIVE_CACHE", str(tmp_path / "guard"))
    monkeypatch.setenv("GPUPOOL_NATIVE_CLIENT_CACHE", str(tmp_path / "client"))
    before = native.library_path(), build.built_path()
    edited = tmp_path / "sdpa_choice.h"
    shutil.copy(native.HEADER, edited)
    assert (native.library_path(), build.built_path()) == before  # the same bytes elsewhere: the same keys
    edited.write_text(edited.read_text() + "\n// an edit\n")
    monkeypatch.setattr(native, "HEADER", edited)
    monkeypatch.setattr(build, "HEADER", edited)
    after = native.library_path(), build.built_path()
    assert after[0] != before[0] and after[1] != before[1]
    assert "-I" + str(edited.parent) in native.compile_command(tmp_path / "x.so")  # the hashed header is the built one
