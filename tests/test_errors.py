"""The error classes: one StagerError subclass per kind, the engine's and the transport's from one set
of kinds, I/O errors still recognizable as FileNotFoundError / PermissionError, and every one of
them still a ``stager.StagerError`` and a ``RuntimeError``."""

from __future__ import annotations

import errno
import os
import pickle

import pytest
import torch

import stager
from stager import _native, errors
from stager.transport import errors as transport_errors


def _is_stager_error(err: BaseException) -> None:
    assert isinstance(err, stager.StagerError) and isinstance(err, RuntimeError), type(err).__mro__
    assert err.kind in errors.KINDS or err.kind in transport_errors.FATAL_KINDS | {
        errors.REMOTE, errors.UNSENDABLE, errors.LOCAL, errors.BROKEN}, err.kind


def test_missing_file_is_a_file_not_found_error(tmp_path):
    """The engine's ENOENT: caught by ``except FileNotFoundError`` and by ``except StagerError``."""
    path = tmp_path / "missing.stager"
    with pytest.raises(FileNotFoundError) as caught:
        stager.load(path)
    err = caught.value
    _is_stager_error(err)
    assert isinstance(err, errors.StagerIOError) and isinstance(err, errors.StagerFileNotFoundError)
    assert err.kind == "io" and err.errno == errno.ENOENT and str(path) in str(err), (err.kind, err.errno, str(err))


def test_refused_file_is_a_permission_error():
    """The engine's EACCES (sysfs refuses new files, even to root): a PermissionError."""
    if not os.path.isdir("/sys/kernel"):
        pytest.skip("no sysfs")
    with pytest.raises(stager.StagerError) as caught:
        _native.AtomicFile("/sys/kernel/stager-test.stager")
    err = caught.value
    _is_stager_error(err)
    if err.errno not in (errno.EACCES, errno.EPERM):
        pytest.skip(f"sysfs answered {errno.errorcode.get(err.errno, err.errno)} here")
    assert isinstance(err, PermissionError) and isinstance(err, errors.StagerPermissionError), type(err).__mro__
    assert not os.path.exists("/sys/kernel/stager-test.stager")


def test_python_raised_io_errors_take_the_same_classes(tmp_path):
    """Errors raised from Python (files.os_error) map errno the way the engine's do."""
    from stager.files import os_error

    for code, expected, also in [(errno.ENOENT, errors.StagerFileNotFoundError, FileNotFoundError),
                                 (errno.EACCES, errors.StagerPermissionError, PermissionError),
                                 (errno.EPERM, errors.StagerPermissionError, PermissionError),
                                 (errno.ENOSPC, errors.StagerIOError, stager.StagerError)]:
        err = os_error(f"cannot write {tmp_path}", OSError(code, os.strerror(code)))
        _is_stager_error(err)
        assert type(err) is expected and isinstance(err, also) and err.errno == code, (code, type(err))
        assert errno.errorcode[code] in str(err) and err.kind == "io"


def test_invalid_file_and_invalid_argument(tmp_path):
    path = tmp_path / "garbage.stager"
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(errors.InvalidFileError) as caught:
        stager.load(path)
    _is_stager_error(caught.value)
    assert caught.value.kind == "invalid_file"
    assert not isinstance(caught.value, OSError)

    with pytest.raises(errors.InvalidArgumentError) as caught:
        _native.Completion(1).mark_complete(5)
    _is_stager_error(caught.value)
    assert caught.value.kind == "invalid_argument"


def test_python_raised_error_keeps_the_base_class():
    """A StagerError raised from Python without a kind stays the base class, kind "error"."""
    with pytest.raises(stager.StagerError) as caught:
        stager.save({"t": torch.zeros(2)}, "")
    _is_stager_error(caught.value)


def test_transport_kinds_have_classes_and_share_timeout():
    """TransportError(kind, ...) is the kind's class; a transport timeout is the engine's timeout
    class too; each pickles with its kind and rank (it crosses process boundaries)."""
    TransportError = stager.transport.TransportError
    expected = {
        errors.TIMEOUT: transport_errors.TransportTimeoutError,
        errors.CONNECTION: transport_errors.PeerConnectionError,
        errors.REMOTE: transport_errors.RemoteError,
        errors.UNSENDABLE: transport_errors.UnsendableError,
        errors.PROTOCOL: transport_errors.ProtocolError,
        errors.LOCAL: transport_errors.LocalHandlingError,
        errors.BROKEN: transport_errors.BrokenGroupError,
    }
    for kind, cls in expected.items():
        err = TransportError(kind, f"rank 3 {kind}", 3)
        _is_stager_error(err)
        assert type(err) is cls and isinstance(err, TransportError), (kind, type(err))
        assert err.kind == kind and err.rank == 3 and str(err) == f"rank 3 {kind}"
        assert err.fatal == (kind in transport_errors.FATAL_KINDS)
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is cls and back.kind == kind and back.rank == 3 and str(back) == str(err)
    assert isinstance(TransportError(errors.TIMEOUT, "late"), errors.StagerTimeoutError)
    assert errors.error_class("timeout") is errors.StagerTimeoutError
