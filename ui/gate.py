"""The optional access gate, configured in `.streamlit/secrets.toml`:

- Streamlit's built-in OIDC login when an `[auth]` section is present (see `st.login`), or
- a shared team password: `[access]` / `password = "..."` (or a top-level `password`).

With neither, the app is open (for a laptop or a trusted network).
"""

from __future__ import annotations

import hmac
from typing import Any

import streamlit as st


def _secrets() -> dict[str, Any]:
    try:
        return st.secrets.to_dict()
    except Exception:  # no secrets.toml anywhere: no gate
        return {}


def _password(secrets: dict[str, Any]) -> str | None:
    access = secrets.get("access")
    if isinstance(access, dict) and access.get("password"):
        return str(access["password"])
    if secrets.get("password"):
        return str(secrets["password"])
    return None


def mode() -> str:
    """'oidc', 'password' or 'open'."""
    secrets = _secrets()
    if isinstance(secrets.get("auth"), dict) and secrets["auth"]:
        return "oidc"
    return "password" if _password(secrets) else "open"


def signed_in() -> bool:
    """Whether the visitor is in (the app is open, or they signed in); draws nothing."""
    gate = mode()
    if gate == "oidc":
        return bool(getattr(st.user, "is_logged_in", False))
    return gate == "open" or bool(st.session_state.get("gate.ok"))


def user_name() -> str | None:
    """Who is signed in with the team login (their e-mail or name); None without one."""
    if mode() == "oidc" and getattr(st.user, "is_logged_in", False):
        return st.user.get("email") or st.user.get("name")
    return None


def check() -> bool:
    """Draw the sign-in screen if the visitor is not in yet; True once they are."""
    gate = mode()
    if signed_in():
        if gate == "oidc":
            with st.sidebar:
                who = st.user.get("email") or st.user.get("name") or "signed in"
                st.caption(f"Signed in as {who}")
                st.button("Log out", key="gate.logout", on_click=st.logout)
        return True
    if gate == "oidc":
        st.title("Transfer Lab")
        st.info("This dashboard is private. Sign in with your team account to continue.")
        st.button("Log in", key="gate.login", type="primary", on_click=st.login)
        return False

    st.title("Transfer Lab")
    with st.form("gate.form"):
        typed = st.text_input("Team password", type="password", key="gate.password")
        submitted = st.form_submit_button("Enter", type="primary")
    if submitted:
        expected = _password(_secrets()) or ""
        if hmac.compare_digest(typed.encode(), expected.encode()):
            st.session_state["gate.ok"] = True
            st.session_state.pop("gate.password", None)
            st.rerun()
        st.error("That password is not right. Ask whoever runs this server for the team password.")
    return False
