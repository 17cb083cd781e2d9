//! Embeds every `tenant_templates/V*.sql` into the binary, so that adding a
//! template version is adding a file (no code change).
use std::{env, fs, path::Path};

fn main() {
    let dir = Path::new(&env::var("CARGO_MANIFEST_DIR").unwrap()).join("tenant_templates");
    println!("cargo:rerun-if-changed={}", dir.display());
    // `refinery::embed_migrations!` reads system_migrations/ as the crate
    // compiles: a file added there must make it compile again.
    println!(
        "cargo:rerun-if-changed={}",
        Path::new(&env::var("CARGO_MANIFEST_DIR").unwrap())
            .join("system_migrations")
            .display()
    );
    let mut files: Vec<_> = fs::read_dir(&dir)
        .expect("tenant_templates/ exists")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "sql"))
        .collect();
    files.sort();
    let mut out = String::from("pub static BUILTIN: &[(&str, &str)] = &[\n");
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
        out.push_str(&format!(
            "    ({:?}, include_str!({:?})),\n",
            f.file_name().unwrap().to_string_lossy(),
            f.display().to_string()
        ));
    }
    out.push_str("];\n");
    fs::write(
        Path::new(&env::var("OUT_DIR").unwrap()).join("templates.rs"),
        out,
    )
    .unwrap();
}
