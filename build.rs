//! Fingerprints static/ so the page can reference `/static/app.css?v=<hash>` and nginx can let
//! browsers cache static files for a year.

use std::hash::Hasher;

fn main() {
    println!("cargo:rerun-if-changed=static");
    let mut paths: Vec<_> = std::fs::read_dir("static")
        .expect("static/ is part of the source")
        .map(|entry| entry.expect("static/ is readable").path())
        .collect();
    paths.sort();
    // FNV-1a: stable across Rust versions, unlike DefaultHasher.
    let mut hash = Fnv(0xcbf2_9ce4_8422_2325);
    for path in paths {
        println!("cargo:rerun-if-changed={}", path.display());
        hash.write(path.file_name().unwrap().as_encoded_bytes());
        hash.write(&std::fs::read(&path).expect("static file is readable"));
    }
    println!("cargo:rustc-env=PAGEVIEWS_STATIC_VERSION={:016x}", hash.finish());
}

struct Fnv(u64);

impl Hasher for Fnv {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}
