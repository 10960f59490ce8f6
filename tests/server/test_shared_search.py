"""Shared configurations (visibility rules, file copying, copy/like/update/delete) and search, via the SDK."""

from __future__ import annotations

import pytest
import runrl
from runrl.exceptions import AuthorizationError, NotFoundError, ValidationError

from tests.server.conftest import PROMPTS, REWARD


def test_shared_configuration_round_trip(live):
    alice = runrl.RunRLClient(api_key=live.key("alice"), base_url=live.url)
    bob = runrl.RunRLClient(api_key=live.key("bob"), base_url=live.url)
    p = alice.files.create_from_content(name="prompts", content=PROMPTS, file_type="prompt")
    r = alice.files.create_from_content(name="reward", content=REWARD, file_type="reward_function")
    cfg = {"model": "Qwen/Qwen3-4B", "reward_mode": "reward_function", "completion_length": 256, "epochs": 2}
    shared = alice.shared_configurations.create(name="Say words", visibility="unlisted", prompt_file_id=p.id,
                                                reward_file_id=r.id, configuration=cfg, description="demo")
    assert shared.is_owner and shared.configuration == cfg and shared.files["prompt_file"]["id"] == p.id
    assert shared.shareable_url.endswith(f"config={shared.uuid}") and shared.stats == {"likes": 0, "copies": 0}
    private = alice.shared_configurations.create(name="secret", visibility="private", configuration={})
    public = alice.shared_configurations.create(name="Open", visibility="public", configuration={"model": "m1"})
    assert [c.name for c in alice.shared_configurations.list().items] == ["Open", "secret", "Say words"]
    assert bob.shared_configurations.list().items == []
    # visibility: unlisted readable by uuid, private is 404; browse lists public and unlisted (spec §1.7)
    seen = bob.shared_configurations.get(shared.uuid)
    assert not seen.is_owner and seen.creator["name"] == "alice"
    with pytest.raises(NotFoundError):
        bob.shared_configurations.get(private.uuid)
    with pytest.raises(NotFoundError):
        bob.shared_configurations.data(private.uuid)
    assert [c.uuid for c in bob.shared_configurations.browse().items] == [public.uuid, shared.uuid]
    assert [c.uuid for c in bob.shared_configurations.browse(model="m1").items] == [public.uuid]
    assert bob.shared_configurations.browse(model="other").items == []
    assert [c.uuid for c in bob.shared_configurations.browse(visibility="unlisted").items] == [shared.uuid]
    assert [c.uuid for c in bob.shared_configurations.browse(reward_mode="reward_function").items] == [shared.uuid]
    with pytest.raises(ValidationError, match="visibility"):
        bob.shared_configurations.browse(visibility="private")
    # data: prompt preview + reward code snippet
    data = bob.shared_configurations.data(shared.uuid)
    assert data["reward_code"] == REWARD.rstrip("\n") and data["prompt_preview"]["lines"][0]["expected"] == "hi"
    # copy clones the files into bob's account
    copied = bob.shared_configurations.copy(shared.uuid)
    assert copied["prompt_file_id"] not in (None, p.id) and copied["reward_file_id"] not in (None, r.id)
    assert bob.files.content(copied["reward_file_id"]) == REWARD
    assert bob.shared_configurations.get(copied["uuid"]).visibility == "private"
    assert alice.shared_configurations.get(shared.uuid).stats["copies"] == 1
    # saving a recipe with another user's shared files copies them; unshared files are refused
    mine = bob.shared_configurations.create(name="remix", visibility="public", prompt_file_id=p.id, configuration={})
    copied_id = mine.files["prompt_file"]["id"]
    assert copied_id != p.id and bob.files.retrieve(copied_id).name == "prompts"
    alice_only = alice.files.create_from_content(name="hidden", content=REWARD, file_type="reward_function")
    with pytest.raises(ValidationError):
        bob.shared_configurations.create(name="steal", reward_file_id=alice_only.id, configuration={})
    # like toggles
    assert bob.shared_configurations.like(shared.uuid) == {"uuid": shared.uuid, "liked": True, "likes": 1}
    assert bob.shared_configurations.get(shared.uuid).liked is True
    assert bob.shared_configurations.like(shared.uuid)["liked"] is False
    # only the owner updates or deletes
    with pytest.raises(AuthorizationError):
        bob.shared_configurations.update(shared.uuid, name="mine")
    with pytest.raises(AuthorizationError):
        bob.shared_configurations.delete(shared.uuid)
    updated = alice.shared_configurations.update(shared.uuid, visibility="private", description="d2")
    assert updated.visibility == "private" and updated.description == "d2"
    with pytest.raises(NotFoundError):
        bob.shared_configurations.get(shared.uuid)
    alice.shared_configurations.delete(shared.uuid)
    with pytest.raises(NotFoundError):
        alice.shared_configurations.get(shared.uuid)
    with pytest.raises(ValidationError):
        alice.shared_configurations.create(name="bad", visibility="everyone", configuration={})


def test_search(live):
    alice = runrl.RunRLClient(api_key=live.key("alice"), base_url=live.url)
    bob = runrl.RunRLClient(api_key=live.key("bob"), base_url=live.url)
    p = alice.files.create_from_content(name="math prompts", content=PROMPTS, file_type="prompt")
    r = alice.files.create_from_content(name="math reward", content=REWARD, file_type="reward_function")
    alice.tools.create(name="math tool", mcp_url="https://tools.example/mcp", description="calculator")
    bob.tools.create(name="bob math", mcp_url="https://tools.example/mcp")
    bob.tools.create(name="public math", mcp_url="https://tools.example/mcp", is_public=True)
    run = alice.runs.create(model="builtin:tiny", type="reward_function", prompt_file_id=p.id, reward_file_id=r.id,
                            completion_length=128, run_name="sleep=0,code=0").initial
    res = alice.search.query("math")
    assert {f["name"] for f in res.files} == {"math prompts", "math reward"}
    assert {t["name"] for t in res.tools} == {"math tool", "public math"}
    assert alice.search.query("tiny").runs[0]["id"] == run.id
    assert alice.search.query(str(run.id)).runs[0]["id"] == run.id
    assert bob.search.query("math").files == [] and bob.search.query("tiny").runs == []
    assert alice.search.query("calculator").tools[0]["name"] == "math tool"


def test_async_sdk_client(live):
    import asyncio

    async def main() -> None:
        client = runrl.AsyncRunRLClient(api_key=live.key(), base_url=live.url)
        f = await client.files.create_from_content(name="r", content=REWARD, file_type="reward_function")
        assert (await client.files.retrieve(f.id)).name == "r"
        assert [x.id for x in (await client.files.list()).items] == [f.id]
        res = await client.validation.reward_function(code=REWARD)
        assert res.valid
        assert (await client.runs.list()).items == []

    asyncio.run(main())
