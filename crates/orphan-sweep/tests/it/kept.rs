//! What `PgSweepState` keeps of a tick: the sightings a tick hands back after recording them
//! answer the next read only while the inventory's generation is the one its own record
//! committed. Any write of the state by anyone else (another replica, an older binary, the
//! console, an operator's `psql`) is read from the tables.

use keel_orphan_sweep::postgres::PgSweepState;
use keel_orphan_sweep::{
    Action, Blocker, InventorySource, PeriodClaim, Sighting, SightingChanges, SweepState as _,
    TickReport, advance,
};
use keel_testkit::TestDatabase;
use time::OffsetDateTime;

use crate::{claim_period, fixture, next_period, quick};

const SOURCE: InventorySource = InventorySource::Postgres;

fn key(c: char) -> String {
    format!("customer_database:{}", c.to_string().repeat(48))
}

/// Four sightings first seen in `claim`'s period: two reclaimable, two not.
fn first_seen(claim: &PeriodClaim) -> Vec<Sighting> {
    let start = time::macros::datetime!(2026-12-01 10:00 UTC);
    ['a', 'b', 'c', 'd']
        .into_iter()
        .map(|c| advance(None, key(c), claim.period, start, c == 'a' || c == 'c').0)
        .collect()
}

/// `state`'s sightings of [`SOURCE`], by key.
async fn read(state: &PgSweepState) -> Vec<Sighting> {
    let mut read = state.sightings(SOURCE).await.unwrap();
    read.sort_by(|a, b| a.key.cmp(&b.key));
    read
}

/// What the tables hold, read by a store that has kept nothing.
async fn stored(db: &TestDatabase) -> Vec<Sighting> {
    read(&PgSweepState::new(db.pool().clone(), "reader")).await
}

/// A store that recorded [`first_seen`] in `period`, the claim of the period after it, and what
/// a tick in that next period reads.
async fn recorded_then_read(
    db: &TestDatabase,
    period: i64,
) -> (PgSweepState, PeriodClaim, Vec<Sighting>) {
    let state = PgSweepState::new(db.pool().clone(), "it");
    let claim = claim_period(db, SOURCE, period).await;
    state
        .replace(SOURCE, &claim, &first_seen(&claim))
        .await
        .unwrap();
    let next = claim_period(db, SOURCE, period + 1).await;
    let before = read(&state).await;
    (state, next, before)
}

/// Every sighting of `before` seen again in `next`'s period, as reclaimable as it was, and
/// which of them only carry their stored run on (all, as a tick works it out).
fn carried_on(before: &[Sighting], next: &PeriodClaim) -> (Vec<Sighting>, Vec<bool>) {
    let later = time::macros::datetime!(2026-12-01 11:00 UTC);
    let now: Vec<Sighting> = before
        .iter()
        .map(|s| {
            advance(
                Some(s),
                s.key.clone(),
                next.period,
                later,
                s.consecutive > 0,
            )
            .0
        })
        .collect();
    let continued = now
        .iter()
        .zip(before)
        .map(|(n, b)| n.continues(b))
        .collect();
    (now, continued)
}

/// Runs `sql` with the state's triggers off, so that it changes the sightings without moving the
/// generation: what no writer can do, and what shows where a read was answered from.
async fn behind_the_generation(db: &TestDatabase, sql: &str) {
    for statement in [
        "ALTER TABLE orphan_sighting_runs DISABLE TRIGGER USER",
        sql,
        "ALTER TABLE orphan_sighting_runs ENABLE TRIGGER USER",
    ] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(statement.to_owned()))
            .execute(db.pool())
            .await
            .unwrap();
    }
}

/// A store that recorded a tick and was handed its sightings back answers the next read with
/// them, without reading the runs (a change made behind the generation is not seen); once any
/// writer changed the state, in any way, the next read is what the tables hold.
#[tokio::test]
async fn a_kept_tick_answers_the_next_read_only_until_anyone_writes_the_state() {
    let db = keel_testkit::database().await;
    let state = PgSweepState::new(db.pool().clone(), "it");
    let replica = PgSweepState::new(db.pool().clone(), "replica");
    // The very first record of an inventory is never kept: until its row exists, nothing holds
    // off a concurrent writer.
    let start = claim_period(&db, SOURCE, 999).await;
    state
        .replace(SOURCE, &start, &first_seen(&start))
        .await
        .unwrap();
    state.keep_recorded(SOURCE, first_seen(&start));
    behind_the_generation(
        &db,
        "UPDATE orphan_sighting_runs SET quarantined = 'hidden'",
    )
    .await;
    assert!(
        read(&state).await.iter().all(|s| s.quarantined.is_some()),
        "the inventory's very first record was kept"
    );

    let claim = claim_period(&db, SOURCE, 1_000).await;
    let seen = first_seen(&claim);
    state.replace(SOURCE, &claim, &seen).await.unwrap();
    state.keep_recorded(SOURCE, seen.clone());
    behind_the_generation(
        &db,
        "UPDATE orphan_sighting_runs SET quarantined = 'hidden'",
    )
    .await;
    assert_eq!(
        read(&state).await,
        seen,
        "the read was not answered from what the store kept"
    );
    assert!(stored(&db).await.iter().all(|s| s.quarantined.is_some()));

    // Each writer changes the state after a kept record; the next read must see it.
    let writers: [(&str, &str); 6] = [
        (
            "an operator's UPDATE of a run",
            "UPDATE orphan_sighting_runs SET quarantined = 'by hand' WHERE key LIKE '%:b%'",
        ),
        (
            "an INSERT of a run",
            "INSERT INTO orphan_sighting_runs (inventory, key, first_seen) \
             VALUES ('postgres', 'customer_database:' || repeat('e', 48), now())",
        ),
        (
            "a DELETE of a run",
            "DELETE FROM orphan_sighting_runs WHERE key LIKE '%:c%'",
        ),
        ("a TRUNCATE of the runs", "TRUNCATE orphan_sighting_runs"),
        (
            "an UPDATE of the inventory's row naming its generation",
            "UPDATE orphan_sweep_recorded SET last_period = last_period, generation = generation",
        ),
        ("another replica's record", ""),
    ];
    for (period, (writer, sql)) in (1_001..).zip(writers) {
        let claim = claim_period(&db, SOURCE, period).await;
        let seen = first_seen(&claim);
        state.replace(SOURCE, &claim, &seen).await.unwrap();
        state.keep_recorded(SOURCE, seen.clone());
        let changed = if sql.is_empty() {
            let newer = claim_period(&db, SOURCE, period + 100).await;
            let mut theirs = first_seen(&newer);
            theirs.truncate(1);
            replica.replace(SOURCE, &newer, &theirs).await.unwrap();
            true
        } else {
            let generation = |db: &TestDatabase| {
                let pool = db.pool().clone();
                async move {
                    sqlx::query_scalar::<_, i64>(
                        "SELECT generation FROM orphan_sweep_recorded WHERE inventory = 'postgres'",
                    )
                    .fetch_one(&pool)
                    .await
                    .unwrap()
                }
            };
            let before = generation(&db).await;
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
                .execute(db.pool())
                .await
                .unwrap();
            assert_ne!(
                generation(&db).await,
                before,
                "{writer} kept the generation"
            );
            !sql.starts_with("UPDATE orphan_sweep_recorded")
        };
        let truth = stored(&db).await;
        assert_eq!(read(&state).await, truth, "after {writer}");
        if changed {
            assert_ne!(truth, seen, "{writer} changed nothing");
        }
    }
}

/// What a store cannot vouch for is never answered from memory: a record whose changes were
/// worked out from a state someone changed before it committed, a record refused under a lost
/// claim, and sightings other than the ones recorded.
#[tokio::test]
async fn sightings_a_store_cannot_vouch_for_are_never_answered_from_memory() {
    let db = keel_testkit::database().await;
    // The tick reads, an operator quarantines `b`, the tick records what it worked out from
    // its read: every sighting carries on, so none is written, and `b` stays quarantined.
    let (state, next, before) = recorded_then_read(&db, 2_000).await;
    sqlx::query("UPDATE orphan_sighting_runs SET quarantined = 'by hand' WHERE key = $1")
        .bind(key('b'))
        .execute(db.pool())
        .await
        .unwrap();
    let (now, continued) = carried_on(&before, &next);
    assert!(continued.iter().all(|&c| c));
    let changes = SightingChanges {
        continued: &continued,
        vanished: &[],
    };
    state.record(SOURCE, &next, &now, changes).await.unwrap();
    state.keep_recorded(SOURCE, now.clone());
    let truth = stored(&db).await;
    assert_eq!(truth[1].quarantined.as_deref(), Some("by hand"));
    assert_eq!(
        read(&state).await,
        truth,
        "a record over a state changed since its read was kept"
    );

    // A record refused under a lost claim: what it is handed back is not kept.
    let _newer = claim_period(&db, SOURCE, 2_002).await;
    assert!(state.replace(SOURCE, &next, &[]).await.is_err());
    state.keep_recorded(SOURCE, Vec::new());
    assert_eq!(
        read(&state).await,
        truth,
        "a refused record's sightings were kept"
    );

    // Other sightings than the ones recorded are not kept.
    let last = claim_period(&db, SOURCE, 2_003).await;
    let seen = first_seen(&last);
    state.replace(SOURCE, &last, &seen).await.unwrap();
    state.keep_recorded(SOURCE, seen[..2].to_vec());
    assert_eq!(read(&state).await, seen, "a different list was kept");

    // Kept sightings read back as the tables hold them: instants to the microsecond, and a
    // run's length as its stored first period gives it.
    let fine = claim_period(&db, SOURCE, 2_004).await;
    let mut seen = first_seen(&fine);
    for (n, sighting) in (1_i64..).zip(&mut seen) {
        sighting.first_seen += time::Duration::nanoseconds(1_000 * n + 7);
        sighting.reclaimable_since = None;
        sighting.consecutive = 3;
    }
    state.replace(SOURCE, &fine, &seen).await.unwrap();
    state.keep_recorded(SOURCE, seen.clone());
    let truth = stored(&db).await;
    assert!(
        truth
            .iter()
            .all(|s| s.first_seen.nanosecond() % 1_000 == 0 && s.consecutive == 0)
    );
    assert_eq!(
        read(&state).await,
        truth,
        "kept sightings differ from the tables'"
    );
}

/// A running sweeper's read is answered from what its last tick recorded (a change behind the
/// generation is not seen) once its inventory's state exists, and an operator's quarantine
/// written from `psql` between two ticks is honoured at the next one.
#[tokio::test]
async fn a_running_sweeper_reads_what_it_recorded_and_still_honours_a_hand_edit() {
    let f = fixture().await;
    let mut sweeper = f.sweeper(quick(true, false));
    let blockers = |report: &TickReport| -> Vec<(Option<Blocker>, Action)> {
        let TickReport::Swept { candidates, .. } = report else {
            panic!("the tick did not complete: {report:?}");
        };
        candidates
            .iter()
            .filter(|c| c.owned && !c.protected)
            .map(|c| (c.blocked_by, c.action))
            .collect()
    };
    // The first tick creates the inventory's state (not kept), the second carries it on.
    for _ in 0..2 {
        next_period().await;
        let tick = sweeper.tick(OffsetDateTime::now_utc()).await;
        assert!(!blockers(&tick).is_empty());
    }
    let quarantine = "UPDATE orphan_sighting_runs SET quarantined = 'by hand'";

    behind_the_generation(&f.db, quarantine).await;
    next_period().await;
    let second = sweeper.tick(OffsetDateTime::now_utc()).await;
    assert!(
        blockers(&second)
            .iter()
            .all(|(blocker, _)| *blocker != Some(Blocker::Quarantined)),
        "the second tick read the tables: {second:?}"
    );

    sqlx::raw_sql(sqlx::AssertSqlSafe(quarantine.to_owned()))
        .execute(f.db.pool())
        .await
        .unwrap();
    next_period().await;
    let third = sweeper.tick(OffsetDateTime::now_utc()).await;
    let third = blockers(&third);
    assert!(!third.is_empty());
    assert!(
        third
            .iter()
            .all(|(blocker, action)| *blocker == Some(Blocker::Quarantined)
                && *action == Action::Reported),
        "the quarantine written between ticks was not honoured: {third:?}"
    );
}

/// A hand edit still in flight when a tick records (its transaction open, the inventory's row
/// already moved by its trigger) makes the record wait for it, and what the record is then
/// handed back is not kept: the edit is read at the next read.
#[tokio::test]
async fn a_write_in_flight_during_a_record_is_never_hidden_by_what_was_kept() {
    let db = keel_testkit::database().await;
    let (state, next, before) = recorded_then_read(&db, 3_000).await;
    let (now, continued) = carried_on(&before, &next);

    let mut edit = db.pool().begin().await.unwrap();
    sqlx::query("UPDATE orphan_sighting_runs SET quarantined = 'in flight' WHERE key = $1")
        .bind(key('b'))
        .execute(&mut *edit)
        .await
        .unwrap();
    let changes = SightingChanges {
        continued: &continued,
        vanished: &[],
    };
    let (recorded, committed) = tokio::join!(state.record(SOURCE, &next, &now, changes), async {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        edit.commit().await
    });
    recorded.unwrap();
    committed.unwrap();
    state.keep_recorded(SOURCE, now.clone());
    let truth = stored(&db).await;
    assert_eq!(truth[1].quarantined.as_deref(), Some("in flight"));
    assert_eq!(
        read(&state).await,
        truth,
        "a record that waited for another write was kept"
    );
}
