"""Wallet loading and creation for miners, validators and the ``dt-chain`` CLI.

bittensor's ``Wallet`` is lazy: a missing or unreadable key only surfaces at
the first signature, deep inside a training or scoring loop. Loading here
reads the public coldkey and the hotkey up front so a wrong
``--wallet.name``/``--wallet.hotkey`` fails at startup with one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Union

if TYPE_CHECKING:  # imported lazily: bittensor costs ~1s and the CLI often needs no wallet
    import bittensor as bt

DEFAULT_WALLET_PATH = "~/.bittensor/wallets"


class WalletError(RuntimeError):
    """A wallet could not be loaded or created; the message names the fix."""


def _check_names(name: str, hotkey: str) -> None:
    # "/" would make bt.Wallet parse "cold/hot" shorthand or escape the wallet dir.
    for kind, value in (("wallet name", name), ("hotkey name", hotkey)):
        if not isinstance(value, str) or not value.strip() or "/" in value or value in {".", ".."}:
            raise WalletError(
                f"invalid {kind} {value!r}: use a plain non-empty name (fix --wallet.name/--wallet.hotkey)"
            )


def _wallet(name: str, hotkey: str, path: Union[str, Path]) -> "bt.Wallet":
    import bittensor as bt

    _check_names(name, hotkey)
    return bt.Wallet(name=name, hotkey=hotkey, path=str(Path(path).expanduser()))


def _missing(name: str, hotkey: str, path: Union[str, Path]) -> WalletError:
    return WalletError(
        f"wallet {name}/hotkey {hotkey} not found under {Path(path).expanduser()}; create it with "
        f"`btcli wallet create` or `dt-chain wallet create --wallet.name {name} --wallet.hotkey {hotkey} "
        f"--wallet.path {path}`"
    )


def load_wallet(name: str, hotkey: str, path: Union[str, Path] = DEFAULT_WALLET_PATH) -> "bt.Wallet":
    """An existing wallet whose coldkeypub and hotkey are present and readable.

    Only the public coldkey is needed (neurons never sign with the coldkey),
    so an encrypted coldkey is fine; the hotkey is decoded now so a broken
    keyfile is reported here rather than at the first signed request.
    """
    wallet = _wallet(name, hotkey, path)
    if not wallet.coldkeypub_file.exists_on_device() or not wallet.hotkey_file.exists_on_device():
        raise _missing(name, hotkey, path)
    try:
        _ = wallet.coldkeypub.ss58_address
        _ = wallet.hotkey.ss58_address
    except Exception as error:  # bittensor_core.KeyfileError, OSError, decode errors
        raise WalletError(
            f"cannot read wallet {name}/hotkey {hotkey} under {Path(path).expanduser()}: {error}; "
            "restore the keyfiles or create a new wallet"
        ) from None
    return wallet


def create_wallet(name: str, hotkey: str, path: Union[str, Path] = DEFAULT_WALLET_PATH) -> "bt.Wallet":
    """Create a password-less wallet, reusing whichever keys already exist.

    Idempotent so test harnesses and cluster scripts can call it on every
    start. Password-less because unattended neurons cannot answer a prompt;
    never use such a coldkey to hold real funds.
    """
    wallet = _wallet(name, hotkey, path)
    if wallet.coldkey_file.exists_on_device() and not wallet.coldkeypub_file.exists_on_device():
        raise WalletError(
            f"wallet {name} has a coldkey but no coldkeypub.txt under {Path(path).expanduser()}; "
            "regenerate the public key with btcli before reusing it"
        )
    try:
        _create_missing(
            wallet.coldkeypub_file.exists_on_device,
            lambda: wallet.create_new_coldkey(use_password=False, overwrite=False, suppress=True),
        )
        _create_missing(
            wallet.hotkey_file.exists_on_device,
            lambda: wallet.create_new_hotkey(use_password=False, overwrite=False, suppress=True),
        )
    except OSError as error:
        raise WalletError(
            f"cannot create wallet {name}/hotkey {hotkey} under {Path(path).expanduser()}: {error}; "
            "pass a writable --wallet.path"
        ) from None
    return load_wallet(name, hotkey, path)


def _create_missing(exists: Callable[[], bool], create: Callable[[], object]) -> None:
    if exists():
        return
    try:
        create()
    except FileExistsError:
        pass  # another process created it between our check and write: reuse theirs
