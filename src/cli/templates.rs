//! `tenantry templates`: what is published in the database (every process
//! provisions and migrates with that set), and publishing new versions.

use clap::Subcommand;

use crate::cli::Failure;
use crate::configuration::Settings;
use crate::startup::Context;
use crate::tenancy::publication::{self, Opening};

#[derive(Subcommand, Debug)]
pub enum TemplatesCommand {
    /// The published template versions: file, checksum, where and when each was published
    List {
        /// Print a JSON object
        #[arg(long)]
        json: bool,
    },
    /// Publish the versions a directory adds after the newest published one, once they build a new tenant (new signups get them at once; `fleet migrate` brings the tenants there)
    Publish {
        /// The directory with V<n>__<name>.sql files (default: TENANTRY_TEMPLATES_DIR, else the built-in templates)
        dir: Option<std::path::PathBuf>,
    },
    /// Print a published version's SQL (to restore a file that was changed)
    Show {
        /// The version number (6 for V6__….sql)
        version: i32,
    },
}

pub async fn run(mut settings: Settings, action: TemplatesCommand) -> Result<(), Failure> {
    match action {
        TemplatesCommand::List { json } => list(settings, json).await,
        TemplatesCommand::Show { version } => show(settings, version).await,
        TemplatesCommand::Publish { dir } => {
            if let Some(dir) = dir {
                if !dir.is_dir() {
                    return Err(Failure::Usage(format!(
                        "{} is not a directory: give the directory that holds the V<n>__<name>.sql files",
                        dir.display()
                    )));
                }
                settings.templates_dir = Some(dir);
            }
            let ctx = Context::open_with(&settings, 1, Opening::Publish).await?;
            crate::cli::fleet::print_publication(&ctx);
            let latest = ctx.templates.get().latest();
            if ctx.publication.published.is_empty() {
                println!(
                    "nothing new to publish from {}: the newest published version is V{latest}{}",
                    ctx.proposals.set.origin(),
                    if ctx.proposals.explicit {
                        ""
                    } else {
                        " (give DIR, or set TENANTRY_TEMPLATES_DIR, to publish a directory)"
                    }
                );
            } else {
                println!(
                    "new signups get V{latest}; `tenantry fleet migrate` brings the tenants there"
                );
            }
            // A version published without its text stays refused: say so.
            crate::cli::fleet::verify_templates(&ctx).await
        }
    }
}

#[derive(serde::Serialize)]
struct Listing {
    published: Vec<publication::Listed>,
    /// Versions this process proposes that are not published.
    proposed: Vec<String>,
    proposed_by: String,
}

async fn list(settings: Settings, json: bool) -> Result<(), Failure> {
    let ctx = Context::open(&settings, 1).await?;
    let client = ctx.pool.get().await?;
    let published = publication::list(&**client).await?;
    drop(client);
    let newest = published.last().map_or(0, |p| p.version);
    let proposed: Vec<String> = ctx
        .proposals
        .set
        .all()
        .iter()
        .filter(|t| t.version().get() > newest)
        .map(|t| t.file_name())
        .collect();
    let listing = Listing {
        published,
        proposed,
        proposed_by: ctx.proposals.set.origin().to_owned(),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&listing)?);
    } else {
        println!(
            "{:<5} {:<40} {:<21} {:<23}  FROM",
            "", "FILE", "CHECKSUM", "PUBLISHED"
        );
        for p in &listing.published {
            println!(
                "V{:<4} {:<40} {:<21} {}  {}{}",
                p.version,
                p.file,
                p.checksum,
                p.published_at.format("%Y-%m-%d %H:%M:%S UTC"),
                p.origin
                    .as_deref()
                    .unwrap_or("recorded before templates were published with their text"),
                if p.usable {
                    ""
                } else {
                    "  [NO USABLE TEXT: `tenantry templates publish DIR` with the directory that holds it]"
                }
            );
        }
        if !listing.proposed.is_empty() {
            println!(
                "not published, proposed by {}: {} (`tenantry templates publish` publishes them)",
                listing.proposed_by,
                listing.proposed.join(", ")
            );
        }
    }
    crate::cli::fleet::verify_templates(&ctx).await
}

async fn show(settings: Settings, version: i32) -> Result<(), Failure> {
    let ctx = Context::open(&settings, 1).await?;
    let client = ctx.pool.get().await?;
    let row = client
        .query_opt(
            "SELECT sql FROM tenantry.templates WHERE version = $1",
            &[&version],
        )
        .await?;
    match row.map(|r| r.get::<_, Option<String>>(0)) {
        Some(Some(sql)) => {
            print!("{sql}");
            Ok(())
        }
        Some(None) => Err(Failure::Other(format!(
            "V{version} is published without its text: `tenantry templates publish DIR` with the directory that holds it"
        ))),
        None => Err(Failure::Usage(format!(
            "no template V{version} is published (`tenantry templates list`)"
        ))),
    }
}
