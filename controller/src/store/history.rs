//! Migrations are forward-only: once released, a migration's SQL never
//! changes, since databases out there already ran it. `migrations.sha256`
//! records the SHA-256 of each migration's text, per engine; these tests
//! fail when an old migration was edited or removed, and when a new one was
//! not recorded (printing the line to add).

use sha2::{Digest, Sha256};

use super::{postgres, sqlite};

/// The committed history.
const HISTORY: &str = include_str!("migrations.sha256");

fn sha256_hex(text: &str) -> String {
    ztmesh_proto::auth::hex(&Sha256::digest(text.as_bytes()))
}

/// Compares `engine`'s `migrations` (1-based numbers) with the `history`
/// file's lines for it.
///
/// # Errors
/// Every difference, one line each.
fn check(engine: &str, migrations: &[&str], history: &str) -> Result<(), String> {
    let mut recorded = Vec::new();
    for (i, line) in history.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [e, n, hash] = fields[..] else {
            return Err(format!(
                "migrations.sha256:{}: expected `ENGINE N SHA256`",
                i + 1
            ));
        };
        if e == engine {
            let n: usize = n
                .parse()
                .map_err(|_| format!("migrations.sha256:{}: bad number {n:?}", i + 1))?;
            recorded.push((n, hash.to_string()));
        }
    }
    let mut errors = Vec::new();
    for (k, (n, hash)) in recorded.iter().enumerate() {
        if *n != k + 1 {
            errors.push(format!(
                "{engine}: migration {n} is out of order in migrations.sha256"
            ));
            continue;
        }
        match migrations.get(k) {
            None => errors.push(format!(
                "{engine} migration {n} was removed: migrations are forward-only: add a new one"
            )),
            Some(m) if sha256_hex(m) != *hash => errors.push(format!(
                "{engine} migration {n} was edited (its SHA-256 was {hash}, is {}): \
                 migrations are forward-only: add a new one",
                sha256_hex(m)
            )),
            Some(_) => {}
        }
    }
    for (k, m) in migrations.iter().enumerate().skip(recorded.len()) {
        errors.push(format!(
            "{engine} migration {} is not recorded: add the line `{engine} {} {}` to \
             controller/src/store/migrations.sha256",
            k + 1,
            k + 1,
            sha256_hex(m)
        ));
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("\n"))
    }
}

#[test]
fn migrations_are_append_only() {
    let sqlite = check("sqlite", sqlite::MIGRATIONS, HISTORY);
    let postgres = check("postgres", postgres::MIGRATIONS, HISTORY);
    if let Err(e) = sqlite.and(postgres) {
        panic!("{e}");
    }
}

#[test]
fn an_edited_removed_or_unrecorded_migration_is_named() {
    let history = "# comment\nsqlite 1 H1\nsqlite 2 H2\npostgres 1 P1\n"
        .replace("H1", &sha256_hex("CREATE TABLE a (x);"))
        .replace("H2", &sha256_hex("ALTER TABLE a ADD y;"));
    assert_eq!(
        check(
            "sqlite",
            &["CREATE TABLE a (x);", "ALTER TABLE a ADD y;"],
            &history
        ),
        Ok(())
    );
    let edited = check(
        "sqlite",
        &["CREATE TABLE a (x, z);", "ALTER TABLE a ADD y;"],
        &history,
    )
    .unwrap_err();
    assert!(edited.contains("sqlite migration 1 was edited"), "{edited}");
    assert!(
        edited.contains("migrations are forward-only: add a new one"),
        "{edited}"
    );
    let removed = check("sqlite", &["CREATE TABLE a (x);"], &history).unwrap_err();
    assert!(
        removed.contains("sqlite migration 2 was removed"),
        "{removed}"
    );
    let added = check(
        "sqlite",
        &[
            "CREATE TABLE a (x);",
            "ALTER TABLE a ADD y;",
            "DROP TABLE a;",
        ],
        &history,
    )
    .unwrap_err();
    assert!(
        added.contains(&format!("`sqlite 3 {}`", sha256_hex("DROP TABLE a;"))),
        "{added}"
    );
    let bad = check("sqlite", &[], "sqlite one").unwrap_err();
    assert!(bad.contains("migrations.sha256:1"), "{bad}");
}

/// Prints the lines of `migrations.sha256` for the current lists (to
/// start the file; new lines are appended by hand, old ones never change).
#[test]
#[ignore = "prints the history file's lines"]
fn print_history() {
    for (engine, list) in [
        ("sqlite", sqlite::MIGRATIONS),
        ("postgres", postgres::MIGRATIONS),
    ] {
        for (k, m) in list.iter().enumerate() {
            println!("{engine} {} {}", k + 1, sha256_hex(m));
        }
    }
}
