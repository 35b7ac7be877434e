//! The `crmguard` binary: the operator and the commands people run around it.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use crmguard::controllers::BuildContext;
use k8s_openapi::jiff::Timestamp;

#[derive(Parser, Debug)]
#[command(
    name = "crmguard",
    version,
    about = "Protects a CRM application running in Kubernetes: verified encrypted backups, least-privilege access, network guard"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print every CustomResourceDefinition as YAML, or write one file per CRD into each --out-dir.
    Crd {
        /// Directory to write `<plural>.<group>.yaml` files into (repeatable). Prints to stdout when absent.
        #[arg(long = "out-dir")]
        out_dirs: Vec<PathBuf>,
    },
    /// Show, without a cluster, every object the operator would create for the given custom resources, and
    /// every validation error the API server or the operator would report.
    Plan {
        /// Files or directories with crmguard resources (YAML or JSON, multi-document allowed). Repeatable.
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        /// Namespace for resources that do not name one.
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        /// Image used by backup and restore jobs.
        #[arg(long, env = "CRMGUARD_IMAGE")]
        image: Option<String>,
    },
}

fn run(cli: Cli) -> Result<ExitCode, String> {
    match cli.command {
        Command::Crd { out_dirs } => {
            let files = crmguard::api::crd_files().map_err(|e| format!("cannot render CRDs as YAML: {e}"))?;
            if out_dirs.is_empty() {
                for (_, text) in &files {
                    print!("---\n{text}");
                }
            }
            for dir in &out_dirs {
                std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
                for (name, text) in &files {
                    let path = dir.join(name);
                    std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Plan { files, namespace, image } => {
            let docs = crmguard::plan::load(&files).map_err(|e| e.to_string())?;
            let mut ctx = BuildContext::default();
            if let Some(image) = image {
                ctx.image = image;
            }
            let plans = crmguard::plan::plan(&docs, namespace.as_deref(), &ctx, Timestamp::now());
            print!("{}", crmguard::plan::render(&plans));
            let refused: Vec<_> = plans.iter().filter(|p| !p.errors.is_empty()).collect();
            let accepted = plans.iter().filter(|p| !p.skipped && p.errors.is_empty()).count();
            let objects: usize = plans.iter().map(|p| p.children.len()).sum();
            eprintln!(
                "plan: {accepted} resource(s) accepted, {} refused, {objects} object(s) to create",
                refused.len()
            );
            for p in &refused {
                for e in &p.errors {
                    eprintln!("error: {} ({}): {e}", p.resource, p.source);
                }
            }
            Ok(if refused.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::from(2)
        }
    }
}
