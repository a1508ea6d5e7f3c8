import devlayer


def test_world_one_init_and_collectives(clean_env):
    with devlayer.init(backend="cpu") as st:
        assert st.world_size == 1
        assert devlayer.all_reduce({"a": 1, "b": 2.0}, op="mean") == {"a": 1.0, "b": 2.0}
