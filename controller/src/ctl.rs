//! placeholder
/// x
#[derive(Debug, Clone, clap::Args)]
pub struct CtlArgs {}
/// x
pub async fn run_ctl(_a: CtlArgs) -> Result<(), String> {
    Ok(())
}
