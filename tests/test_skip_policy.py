"""The skip policy (tests/skip_policy.py), run by pytester on tiny inner test files: any skip of a
test without the ``gpu`` marker fails the run and is listed with its reason; ``gpu`` tests may skip."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

INI = """
[pytest]
markers =
    gpu: needs an NVIDIA GPU
"""


def run(pytester: pytest.Pytester, source: str) -> pytest.RunResult:
    pytester.makeini(INI)
    pytester.makepyfile(test_inner=source)
    return pytester.runpytest_inprocess("-p", "skip_policy", "-p", "no:cacheprovider")


def test_a_skip_without_the_gpu_marker_fails_the_run_and_names_the_reason(pytester):
    result = run(pytester, """
        import pytest

        def test_passes():
            pass

        def test_skips():
            pytest.skip("optional package missing")
    """)
    result.assert_outcomes(passed=1, skipped=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*skipped without the gpu marker*",
                                 "SKIPPED test_inner.py::test_skips: optional package missing"])


def test_a_skip_of_a_gpu_test_passes_the_run(pytester):
    result = run(pytester, """
        import pytest

        def test_passes():
            pass

        @pytest.mark.gpu
        def test_needs_a_gpu():
            pytest.skip("no NVIDIA GPU")

        @pytest.mark.gpu
        @pytest.mark.skipif(True, reason="no NVIDIA GPU")
        def test_needs_a_gpu_too():
            pass
    """)
    result.assert_outcomes(passed=1, skipped=2)
    assert result.ret == pytest.ExitCode.OK
    assert "skipped without the gpu marker" not in result.stdout.str()


def test_a_skip_marker_and_a_skipping_fixture_count_too(pytester):
    result = run(pytester, """
        import pytest

        @pytest.fixture
        def resource():
            pytest.skip("resource not found")

        @pytest.mark.skip(reason="not today")
        def test_marked():
            pass

        def test_uses_resource(resource):
            pass
    """)
    result.assert_outcomes(skipped=2)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["SKIPPED test_inner.py::test_marked: not today",
                                 "SKIPPED test_inner.py::test_uses_resource: resource not found"])


def test_a_module_skipped_while_collecting_fails_the_run(pytester):
    result = run(pytester, """
        import pytest

        pytest.importorskip("a_package_that_is_not_installed")

        def test_never_runs():
            pass
    """)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["SKIPPED test_inner.py: *a_package_that_is_not_installed*"])


def test_xfail_and_failures_keep_their_own_exit_status(pytester):
    result = run(pytester, """
        import pytest

        @pytest.mark.xfail(reason="known bug", strict=True)
        def test_known_bug():
            assert False

        def test_passes():
            pass
    """)
    result.assert_outcomes(passed=1, xfailed=1)
    assert result.ret == pytest.ExitCode.OK
    failing = run(pytester, """
        import pytest

        def test_fails():
            assert False

        def test_skips():
            pytest.skip("also skipped")
    """)
    assert failing.ret == pytest.ExitCode.TESTS_FAILED
    failing.stdout.fnmatch_lines(["SKIPPED test_inner.py::test_skips: also skipped"])
