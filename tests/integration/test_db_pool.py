"""Pooled connections go back without asyncpg's reset round trip; transactions still end."""

from __future__ import annotations

from shared.db import create_pool
from tests.integration.conftest import Infra


async def test_a_released_connection_is_not_reset_but_its_transaction_is_rolled_back(
    infra: Infra,
) -> None:
    pool = await create_pool(infra.database_url, max_size=1)
    try:
        async with pool.acquire() as con:
            await con.execute("SET application_name = 'kept'")
            await con.execute("BEGIN")
            await con.execute("CREATE TEMP TABLE left_open (x int)")
        async with pool.acquire() as con:
            # The same connection (max_size=1): no RESET ALL ran, so the setting is still there…
            assert await con.fetchval("SHOW application_name") == "kept"
            # …but the transaction left open was rolled back, not leaked into this acquirer.
            assert await con.fetchval("SELECT to_regclass('pg_temp.left_open')") is None
            assert not con.is_in_transaction()
    finally:
        await pool.close()
