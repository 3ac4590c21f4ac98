"""License files, SPDX headers and the license_type policy."""

from __future__ import annotations

from graphtune.data.config import DEFAULT_PERMISSIVE
from graphtune.data.licenses import (
    UNKNOWN_LICENSE,
    RepoLicenses,
    detect_license_text,
    is_license_file,
    license_type,
    licenses_for_path,
    parse_spdx_expression,
    spdx_header_licenses,
)


def test_license_file_names():
    for p in ("LICENSE", "LICENSE.md", "licence.txt", "COPYING", "COPYING.LESSER", "LICENSE-MIT", "MIT-LICENSE", "UNLICENSE", "sub/LICENSE", "README.md", "NOTICE"):
        assert is_license_file(p), p
    for p in ("license.py", "src/licenses.go", "setup.py", "main.c"):
        assert not is_license_file(p), p


def test_detects_common_license_texts(data_helpers):
    assert detect_license_text(data_helpers.MIT) == ["MIT"]
    assert detect_license_text(data_helpers.APACHE) == ["Apache-2.0"]
    assert detect_license_text(data_helpers.GPL3) == ["GPL-3.0"]
    assert detect_license_text(data_helpers.BSD3) == ["BSD-3-Clause"]
    assert detect_license_text("This is free and unencumbered software released into the public domain.") == ["Unlicense"]
    assert detect_license_text("All rights reserved. Do not copy.") == []


def test_gpl_mentions_are_not_gpl():
    text = "This license is GPL-compatible; see the GNU General Public License for details. " * 5 + "x" * 3000
    assert "GPL-2.0" not in detect_license_text(text) and "GPL-3.0" not in detect_license_text(text)


def test_readme_uses_license_section_only():
    readme = "# Tool\n\nWe vendor an MIT license library.\n\n## License\n\nLicensed under the Apache License, Version 2.0.\n\n## Credits\nGPLv3 friends\n"
    assert detect_license_text(readme, readme=True) == ["Apache-2.0"]
    assert detect_license_text("# Tool\nNo section here, MIT license mention.\n", readme=True) == []


def test_spdx_headers_and_expressions():
    src = "// SPDX-License-Identifier: (MIT OR Apache-2.0)\n/* SPDX-License-Identifier: GPL-2.0-only */\nint x;\n"
    assert spdx_header_licenses(src) == ["(MIT OR Apache-2.0)", "GPL-2.0-only"]
    assert parse_spdx_expression("(MIT OR Apache-2.0) AND BSD-3-Clause WITH foo") == ["MIT", "Apache-2.0", "BSD-3-Clause", "foo"]


def test_license_type_policy():
    perm = DEFAULT_PERMISSIVE
    assert license_type([], perm) == "no_license"
    assert license_type(["MIT"], perm) == "permissive"
    assert license_type(["MIT", "GPL-3.0"], perm) == "non_permissive"
    assert license_type(["MIT OR GPL-3.0"], perm) == "permissive"
    assert license_type(["MIT AND GPL-3.0"], perm) == "non_permissive"
    assert license_type([UNKNOWN_LICENSE], perm) == "non_permissive"
    # a declared (repository) license decides alone, like GitHub's license field
    assert license_type(["GPL-3.0"], perm, declared="MIT") == "permissive"
    assert license_type([], perm, declared="GPL-3.0") == "non_permissive"
    assert license_type(["MIT"], perm, declared="NOASSERTION") == "permissive"
    # configurable permissive list
    assert license_type(["GPL-3.0"], ["GPL-3.0"]) == "permissive"


def test_directory_scoped_license_files(data_helpers):
    repo = RepoLicenses.from_files([
        ("LICENSE", data_helpers.MIT),
        ("third_party/lib/COPYING", data_helpers.GPL3),
        ("odd/LICENSE", "Proprietary. All rights reserved."),
        ("README.md", "# x\n"),
    ])
    assert repo.root == ["MIT"]
    assert licenses_for_path(repo, "src/a.py") == ["MIT"]
    assert licenses_for_path(repo, "third_party/lib/x/y.c") == ["GPL-3.0", "MIT"]
    assert licenses_for_path(repo, "odd/z.py") == [UNKNOWN_LICENSE, "MIT"]
    assert licenses_for_path(repo, "a.py", ["Apache-2.0"]) == ["Apache-2.0", "MIT"]
    assert RepoLicenses.from_json(repo.to_json()).by_dir == repo.by_dir
