//! Reading a new account's password: typed twice without echo on a
//! terminal, the first line of stdin otherwise (how scripts pipe it in).
//! Commands ask for it only after every check that can fail without it.

use std::io::{IsTerminal, Read};

use super::Failure;
use crate::domain::{Password, Username};

/// The password, checked against the policy (a usage error otherwise).
pub(super) fn read(username: &Username) -> Result<Password, Failure> {
    let raw = if std::io::stdin().is_terminal() {
        from_terminal(username)?
    } else {
        from_stdin()?
    };
    Password::parse(&raw).map_err(|e| Failure::Usage(e.to_string()))
}

/// Twice, without echo: a typo nobody can see would otherwise set a
/// password nobody knows.
fn from_terminal(username: &Username) -> Result<String, Failure> {
    let first = rpassword::prompt_password(format!("password for {username}: "))?;
    let second = rpassword::prompt_password("the same again: ")?;
    if first != second {
        return Err(Failure::Usage("the two passwords differ".into()));
    }
    Ok(first)
}

fn from_stdin() -> Result<String, Failure> {
    let mut all = String::new();
    std::io::stdin()
        .lock()
        .take(4096)
        .read_to_string(&mut all)?;
    let line = all.lines().next().unwrap_or("");
    if line.is_empty() {
        return Err(Failure::Usage(
            "no password on stdin (pipe it in, e.g. `echo \"$PASSWORD\" | tenantry tenants create …`)"
                .into(),
        ));
    }
    Ok(line.to_owned())
}
