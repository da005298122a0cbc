//! A database laid out as production runs it: an owner role that ran the migrations and a
//! separate application role granted least privilege (`keel_schema::roles`).

use keel_schema::roles::AppRole;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Executor, PgPool};

use crate::server::random_password;
use crate::{HarnessError, TestDatabase, finish_soon, open, quote_ident, unique_name};

/// A fresh database owned by a role of its own, migrated by that owner, with an application
/// role granted only what Keel's binaries use. Both roles are dropped with it.
#[derive(Debug)]
pub struct RoleSplitDatabase {
    db: Option<TestDatabase>,
    owner_role: String,
    app_role: AppRole,
    owner: PgPool,
    app: PgPool,
    owner_options: PgConnectOptions,
    app_options: PgConnectOptions,
}

impl RoleSplitDatabase {
    /// A pool connected as the owner (the role `migrate` runs as).
    pub fn owner(&self) -> &PgPool {
        &self.owner
    }

    /// A pool connected as the application role (the role the binaries serve as).
    pub fn app(&self) -> &PgPool {
        &self.app
    }

    /// The owner role's name.
    pub fn owner_role(&self) -> &str {
        &self.owner_role
    }

    /// The application role.
    pub fn app_role(&self) -> &AppRole {
        &self.app_role
    }

    /// Connection options as the owner.
    pub fn owner_options(&self) -> PgConnectOptions {
        self.owner_options.clone()
    }

    /// Connection options as the application role.
    pub fn app_options(&self) -> PgConnectOptions {
        self.app_options.clone()
    }

    /// A `postgres://` URL as the owner (holds its password: do not log it).
    pub fn owner_url(&self) -> String {
        self.owner_options.to_url_lossy().to_string()
    }

    /// A `postgres://` URL as the application role (holds its password: do not log it).
    pub fn app_url(&self) -> String {
        self.app_options.to_url_lossy().to_string()
    }

    /// The underlying database, whose own pool is the server's administrative role.
    pub fn database(&self) -> &TestDatabase {
        self.db
            .as_ref()
            .unwrap_or_else(|| unreachable!("the database is only taken on drop"))
    }
}

impl Drop for RoleSplitDatabase {
    fn drop(&mut self) {
        let Some(mut db) = self.db.take() else { return };
        let server = db.server();
        let name = std::mem::take(&mut db.name);
        drop(db);
        let roles = [self.owner_role.clone(), self.app_role.as_str().to_owned()];
        // The database first (it is owned by the owner role), then both roles.
        finish_soon(async move {
            let _ = server.drop_database(&name).await;
            let Ok(mut admin) = server.connect_admin().await else {
                return;
            };
            for role in roles {
                let _ = admin
                    .execute(sqlx::AssertSqlSafe(format!(
                        "DROP ROLE IF EXISTS {}",
                        quote_ident(&role)
                    )))
                    .await;
            }
        });
    }
}

/// A fresh database migrated by its own owner role, with a separate application role granted
/// least privilege, or why there can't be one.
pub async fn try_role_split_database() -> Result<RoleSplitDatabase, HarnessError> {
    let db = open(None).await?;
    let suffix = unique_name().trim_start_matches("keel_test_").to_owned();
    let owner_role = format!("keel_owner_{suffix}");
    let app_name = format!("keel_app_{suffix}");
    let app_role = AppRole::parse(&app_name).map_err(|_| {
        HarnessError::io(
            "name the application role",
            std::io::Error::other("generated role name is not an identifier"),
        )
    })?;
    let (owner_password, app_password) = (random_password()?, random_password()?);
    let server = db.server();
    let mut admin = server.connect_admin().await?;
    for sql in [
        format!(
            "CREATE ROLE {} LOGIN PASSWORD '{owner_password}'",
            quote_ident(&owner_role)
        ),
        format!(
            "CREATE ROLE {} LOGIN PASSWORD '{app_password}'",
            quote_ident(&app_name)
        ),
        format!(
            "ALTER DATABASE {} OWNER TO {}",
            quote_ident(db.name()),
            quote_ident(&owner_role)
        ),
    ] {
        admin
            .execute(sqlx::AssertSqlSafe(sql))
            .await
            .map_err(|e| HarnessError::database("create the owner and application roles", e))?;
    }
    let owner_options = db
        .connect_options()
        .username(&owner_role)
        .password(&owner_password);
    let app_options = db
        .connect_options()
        .username(&app_name)
        .password(&app_password);
    let owner = PgPoolOptions::new()
        .max_connections(4)
        .connect_with(owner_options.clone())
        .await
        .map_err(|e| HarnessError::database("connect as the owner", e))?;
    keel_schema::migrate(&owner).await?;
    let mut conn = owner
        .acquire()
        .await
        .map_err(|e| HarnessError::database("connect as the owner", e))?;
    keel_schema::roles::grant_app_role(&mut conn, &app_role)
        .await
        .map_err(|e| {
            HarnessError::io(
                "grant the application role",
                std::io::Error::other(e.to_string()),
            )
        })?;
    drop(conn);
    let app = PgPoolOptions::new()
        .max_connections(4)
        .connect_with(app_options.clone())
        .await
        .map_err(|e| HarnessError::database("connect as the application role", e))?;
    Ok(RoleSplitDatabase {
        db: Some(db),
        owner_role,
        app_role,
        owner,
        app,
        owner_options,
        app_options,
    })
}

/// A fresh database migrated by its own owner role, with a separate application role.
///
/// # Panics
///
/// As [`crate::database`].
pub async fn role_split_database() -> RoleSplitDatabase {
    try_role_split_database()
        .await
        .unwrap_or_else(|e| panic!("keel-testkit: no Postgres for this test: {e}"))
}
