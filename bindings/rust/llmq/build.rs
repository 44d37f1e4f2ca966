// Tests and examples of this crate find libllmq at run time where llmq-sys linked it from
// (DEP_LLMQ_LIB_DIR, set by llmq-sys's build script), without LD_LIBRARY_PATH.
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_LLMQ_LIB_DIR");
    if let Some(dir) = std::env::var_os("DEP_LLMQ_LIB_DIR") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir.to_string_lossy());
    }
}
