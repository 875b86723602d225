//! `include/pagewire.h` is what cbindgen makes of the crate (`src/`) now. After changing the ABI,
//! regenerate it with `PAGEWIRE_BLESS=1 cargo test -p pagewire-capi --test header`.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

#[test]
fn the_header_is_current() {
    let dir = env!("CARGO_MANIFEST_DIR");
    let config = cbindgen::Config::from_file(format!("{dir}/cbindgen.toml")).unwrap();
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_crate(dir)
        .with_config(config)
        .generate()
        .unwrap()
        .write(&mut generated);
    let path = format!("{dir}/include/pagewire.h");
    if std::env::var_os("PAGEWIRE_BLESS").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let committed = std::fs::read(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "include/pagewire.h is out of date: run PAGEWIRE_BLESS=1 cargo test -p pagewire-capi --test header"
    );
}
