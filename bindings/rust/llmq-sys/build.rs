// Links libllmq.so. The library is looked for in LLMQ_LIB_DIR, else in the build tree of the
// checkout that holds this crate (<checkout>/build/lib), else where the linker looks by default
// (an installed prefix). The directory is passed on to dependent crates as DEP_LLMQ_LIB_DIR.
use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LLMQ_LIB_DIR");
    let dir = match env::var_os("LLMQ_LIB_DIR") {
        Some(dir) => Some(PathBuf::from(dir)),
        None => {
            let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
            let build_tree = manifest.join("../../../build/lib");
            if build_tree.join("libllmq.so").exists() {
                Some(build_tree.canonicalize().unwrap())
            } else {
                None
            }
        }
    };
    if let Some(dir) = dir {
        println!("cargo:rustc-link-search=native={}", dir.display());
        println!("cargo:lib_dir={}", dir.display());
        // Tests and examples of this crate find the library at run time without LD_LIBRARY_PATH.
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir.display());
    }
    println!("cargo:rustc-link-lib=dylib=llmq");
}
